"""--eval_submit_slurm: after each checkpoint is published, score it on lm-eval tasks in a Slurm job of its own.

Rank 0 runs `sbatch cluster/exec/evaluate.sbatch CHECKPOINT TASKS --metrics_run OUT_DIR` (this checkout's script,
submitted from the checkout's root), with the job's output in OUT_DIR/evals/logs/. The job needs nothing but the
checkpoint, which exists once published, so it has no dependency and runs whenever Slurm has a GPU. Its scores land
in OUT_DIR/evals/ (lit_gpt.benchmarks). Submitting is best effort: a failed sbatch is a warning, never a training
failure. With it, the trainer does not score --eval_tasks itself; --eval_limit and --eval_batch_size go to the
jobs. Inside the Apptainer image (no Slurm there) cluster/exec/train_fabric.sh relays the trainer's sbatch to the
batch host. Checkpoint rotation (--keep_last_checkpoints) may delete a checkpoint before its job runs; the job then says
so and exits 0 (keep more checkpoints, or 0 for all, to score every one).
"""
from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Callable
from pathlib import Path

from lit_gpt.run_dir import RunDir

REPO_ROOT = Path(__file__).resolve().parents[1]
JOB_SCRIPT = REPO_ROOT / "cluster" / "exec" / "evaluate.sbatch"
SUBMIT_TIMEOUT_S = 120  # sbatch waits for a busy slurmctld; training waits for sbatch


def sbatch_environment() -> dict[str, str]:
    """This process's environment without the training job's Slurm variables, which would describe the wrong job to
    sbatch and the evaluation job (SLURM_CONF, which names the cluster, stays)."""
    return {k: v for k, v in os.environ.items()
            if k == "SLURM_CONF" or not k.startswith(("SLURM_", "SRUN_"))}


def submit_evaluation(checkpoint: Path, tasks: str, run_dir: Path, *, limit: int | None = None,
                      batch_size: int | None = None, sbatch_args: str = "",
                      log: Callable[[str], None] = print) -> str | None:
    """Submit the scoring job of `checkpoint` on the comma-separated `tasks`; its Slurm job id, or None (after a
    warning) when sbatch failed."""
    logs = RunDir(run_dir).eval_job_logs
    # The job runs in the checkout's root: task directories given relative to this process's directory are made
    # absolute.
    tasks = ",".join(str(Path(t).resolve()) if Path(t).is_dir() else t for t in tasks.split(",") if t)
    evaluate_flags = [*(["--limit", str(limit)] if limit else []),
                      *(["--batch_size", str(batch_size)] if batch_size else [])]
    command = ["sbatch", "--parsable", f"--output={Path(logs).resolve()}/eval-%j.out", *shlex.split(sbatch_args),
               str(JOB_SCRIPT), str(Path(checkpoint).resolve()), tasks, "--metrics_run", str(Path(run_dir).resolve()),
               *evaluate_flags]
    try:
        logs.mkdir(parents=True, exist_ok=True)  # Slurm does not create the output's directory
        result = subprocess.run(command, cwd=REPO_ROOT, env=sbatch_environment(), capture_output=True, text=True,
                                timeout=SUBMIT_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        reason = "sbatch is not on PATH" if isinstance(e, FileNotFoundError) else str(e)
        log(f"warning: --eval_submit_slurm: could not submit the evaluation of {Path(checkpoint).name} ({reason}); "
            f"training goes on")
        return None
    job_id = result.stdout.strip().split(";")[0]
    if result.returncode != 0 or not job_id.isdigit():
        reason = (result.stderr.strip() or result.stdout.strip() or f"exit status {result.returncode}").splitlines()
        log(f"warning: --eval_submit_slurm: sbatch failed for {Path(checkpoint).name} ({reason[-1]}); training goes "
            f"on")
        return None
    log(f"Submitted Slurm job {job_id}: {tasks} on {Path(checkpoint).name} (log: {logs}/eval-{job_id}.out)")
    return job_id


def check_sbatch_args(sbatch_args: str) -> None:
    """ValueError when the options cannot be split like a shell would (an unclosed quote)."""
    shlex.split(sbatch_args)
