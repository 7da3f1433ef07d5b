"""Running the stages with datatrove's executor: all tasks on this machine, or one task of a Slurm array.

datatrove's LocalPipelineExecutor runs a stage's tasks in a pool of `workers` processes and writes a completion
marker per task (OUTPUT/.staging/logs/STAGE-TASKS/completions), so a re-run starts only unfinished tasks; with
local_tasks=1 and local_rank_offset=RANK the same executor runs one task of a Slurm array job.
"""
from __future__ import annotations

import multiprocessing
from pathlib import Path

from datatrove.executor.local import LocalPipelineExecutor

from lit_gpt.corpus import InputError
from lit_gpt.data_pipeline.steps import STEPS, failures

_START = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"


class _Executor(LocalPipelineExecutor):
    def mark_rank_as_completed(self, rank: int) -> None:
        # A task that stopped early (a malformed record under --on_error stop) must run again next time.
        if all(getattr(step, "finished", True) for step in self.pipeline):
            super().mark_rank_as_completed(rank)


def _executor(work: Path, stage: str, tasks: int, workers: int, **kwargs) -> _Executor:
    return _Executor([STEPS[stage](work)], tasks=tasks, workers=workers, start_method=_START,
                     logging_dir=str(Path(work) / "logs" / f"{stage}-{tasks}"), **kwargs)


def incomplete(work: Path, stage: str, tasks: int) -> list[int]:
    return _executor(work, stage, tasks, 1).get_incomplete_ranks()


def _check(work: Path) -> None:
    failed = failures(work)
    if failed:
        raise InputError(f"{failed[0]} (use --on_error skip to skip malformed records)")


def run_stage(work: Path, stage: str, tasks: int, workers: int) -> None:
    """All tasks of a stage on this machine, `workers` at a time."""
    _check(work)
    _executor(work, stage, tasks, max(1, min(workers, tasks))).run()
    _check(work)
    left = incomplete(work, stage, tasks)
    if left:
        raise RuntimeError(f"stage {stage}: tasks {left} did not finish (see {work}/logs/{stage}-{tasks}/logs)")


def run_task(work: Path, stage: str, tasks: int, rank: int) -> None:
    """One task of a stage (a Slurm array task)."""
    _check(work)
    _executor(work, stage, tasks, 1, local_tasks=1, local_rank_offset=rank).run()
    _check(work)
