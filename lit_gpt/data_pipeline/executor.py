"""The stages as datatrove executors: LocalPipelineExecutor on this machine, SlurmPipelineExecutor on a cluster.

Each stage is one executor of `tasks` tasks over one of our steps, and depends on the stage before it (`depends=`,
which datatrove turns into "run that first" locally and into `--dependency` between the Slurm array jobs). datatrove
writes a completion marker per finished task into the stage's logging folder, so a re-run starts or submits only
unfinished tasks; a task that raises (a malformed record under --on_error stop) is never marked complete.

Local runs keep those folders in OUTPUT/.staging/logs (removed with the staging area by the switch). Slurm runs keep
them beside the job logs, in SLURM_LOGS/RUN_ID/STAGE-TASKS: the pack job's stats merge may still be running when the
finalize job has removed the staging area.
"""
from __future__ import annotations

import errno
import multiprocessing
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from datatrove.executor.local import LocalPipelineExecutor
from datatrove.executor.slurm import SlurmPipelineExecutor
from datatrove.utils.logging import logger, setup_default_logger

from lit_gpt.corpus import InputError
from lit_gpt.data_pipeline.finalize import Finalize
from lit_gpt.data_pipeline.plan import STAGING, Plan
from lit_gpt.data_pipeline.steps import STEPS, RecordError, failures
from lit_gpt.errors import os_error_in

ROOT = Path(__file__).resolve().parents[2]
JOB_ENV = ROOT / "cluster" / "exec" / "prepare_data_env.sh"  # sourced by each job script datatrove writes
_START = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"


def _one_line_record_errors(record: dict) -> None:
    # A malformed record is the user's input and a full disk the machine's, not bugs: datatrove's log of the failed
    # task needs no traceback (the command ends with one error line).
    exception = record["exception"]
    if exception is not None and (isinstance(exception.value, RecordError) or disk_full(exception.value)):
        record["exception"] = None


def disk_full(error: BaseException | None) -> OSError | None:
    """The out-of-space OSError behind `error` (itself or in its chain of causes), if that is what it is."""
    found = os_error_in(error)
    return found if found is not None and found.errno in (errno.ENOSPC, errno.EDQUOT) else None


def run_local(work: Path, plan: Plan, tasks: int, workers: int) -> None:
    """All stages but finalize on this machine, `workers` tasks at a time; the first failure in corpus order as
    one InputError."""
    logger.configure(patcher=_one_line_record_errors)
    setup_default_logger()  # datatrove's console log goes to sys.stderr as it is now (a caller may have replaced it)
    last = None
    for stage in plan.stages:
        last = LocalPipelineExecutor([STEPS[stage](work)], tasks=tasks, workers=max(1, min(workers, tasks)),
                                     logging_dir=str(work / "logs" / f"{stage}-{tasks}"), depends=last,
                                     start_method=_START)
    try:
        last.run()
    except Exception:
        failed = failures(work)
        if not failed:
            raise
        raise InputError(record_error_message(failed[0])) from None


def record_error_message(failure: str) -> str:
    return f"{failure} (use --on_error skip to skip malformed records)"


def sbatch_options(text: str) -> dict[str, str]:
    """--slurm_args ('--partition=cpu --time=4:00:00 --exclusive') as datatrove's sbatch_args."""
    options, words = {}, shlex.split(text)
    while words:
        word = words.pop(0)
        if not word.startswith("--") or len(word) == 2:
            raise InputError(f"--slurm_args: {word!r}: give sbatch options in their long form (--name=value)")
        name, has_value, value = word[2:].partition("=")
        if not has_value and words and not words[0].startswith("-"):
            value = words.pop(0)
        options[name] = value
    return options


def default_partition() -> str:
    """The cluster's default partition (datatrove names one in every job)."""
    listing = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True).stdout.split()
    marked = [p[:-1] for p in listing if p.endswith("*")]
    if not marked:
        raise InputError("--slurm_args: the cluster has no default partition; name one (--partition=NAME)")
    return marked[0]


def job_name(plan: Plan, stage: str) -> str:
    """The Slurm job name of a stage of this run (datatrove's stats merge job after it has the same name)."""
    return f"prepare-{stage}-{plan.run_id}"


def submit_slurm(out: Path, plan: Plan, tasks: int, slurm_args: str, logs: Path) -> dict[str, int | str]:
    """One Slurm array job per stage (its unfinished tasks), each depending on the one before, then the finalize
    job; the job id per stage (-1 for a stage with nothing left to do)."""
    if shutil.which("sbatch") is None:
        raise InputError("--executor slurm: sbatch is not on PATH (run this on a Slurm login node)")
    if "SLURM_ARRAY_TASK_ID" in os.environ:  # datatrove's executor would run as one of its own tasks
        raise InputError("--executor slurm: submit from a login node, not from inside a Slurm array job")
    options = sbatch_options(slurm_args)
    cpus = options.pop("cpus-per-task", "1")
    if not cpus.isdigit() or int(cpus) < 1:
        raise InputError(f"--slurm_args: --cpus-per-task={cpus}: must be a positive whole number")
    common = {"time": options.pop("time", "04:00:00"), "cpus_per_task": int(cpus),
              "partition": options.pop("partition", None) or default_partition(), "qos": options.pop("qos", None),
              "sbatch_args": options, "with_srun": False,
              # The tasks run in this Python environment (its bin folder holds datatrove's launch command).
              "env_command": f"source {shlex.quote(str(JOB_ENV))} {shlex.quote(str(Path(sys.executable).parent))}"}
    logs = logs.resolve()
    folder = logs / plan.run_id
    executors, last = {}, None
    for stage in plan.stages:
        last = executors[stage] = SlurmPipelineExecutor(
            [STEPS[stage](out / STAGING)], tasks=tasks, job_name=job_name(plan, stage), depends=last,
            logging_dir=str(folder / f"{stage}-{tasks}"), slurm_logs_folder=str(logs / f"prepare-{stage}"), **common)
    executors["finalize"] = SlurmPipelineExecutor(
        [Finalize(out, tasks)], tasks=1, job_name=job_name(plan, "finalize"), depends=last, skip_completed=False,
        logging_dir=str(folder / "finalize"), slurm_logs_folder=str(logs / "prepare-finalize"), **common)
    left = {stage: len(e.get_incomplete_ranks()) for stage, e in executors.items()}
    try:
        executors["finalize"].run()
    except subprocess.CalledProcessError as e:
        raise InputError(f"--slurm_args: sbatch refused a job ({e}; its message is above)") from None
    for stage, e in executors.items():
        print(f"{stage}: job {e.job_id} ({left[stage]} task(s))" if e.job_id != -1 else
              f"{stage}: all {e.tasks} tasks already complete")
    return {stage: e.job_id for stage, e in executors.items()}


def finalize_log(logs: Path, job: str) -> Path:
    return logs.resolve() / "prepare-finalize" / f"{job}_0.out"


def wait_for_slurm(plan: Plan, finalize_job: str) -> bool:
    """Wait until the finalize job has left the queue: True; False when a stage failed (a job that waits for it
    can never start), after cancelling this run's remaining jobs."""
    names = ",".join(job_name(plan, stage) for stage in [*plan.stages, "finalize"])
    while True:
        queue = subprocess.run(["squeue", "-h", f"--name={names}", "-o", "%F %r"], capture_output=True,
                               text=True).stdout
        if "DependencyNeverSatisfied" in queue:
            for name in names.split(","):
                subprocess.run(["scancel", f"--name={name}"], capture_output=True)
            return False
        if not any(line.split()[0] == finalize_job for line in queue.splitlines() if line.strip()):
            return True
        time.sleep(2)
