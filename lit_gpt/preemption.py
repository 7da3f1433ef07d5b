"""Slurm's pre-emption warning: SIGUSR1 (`sbatch --signal=USR1@T`) before the time limit, SIGTERM on pre-emption.

The trainer finishes its step, checkpoints and, under Slurm, requeues the job, which then resumes by itself with
`--resume auto`. Install the handler before a long set-up: a signal's default action would kill the job unsaved."""
from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable


class Preemption:
    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def requeue(self, log: Callable[[str], None]) -> None:
        """Requeue this Slurm job (call on one rank, after the checkpoint is written); nothing outside Slurm."""
        job = os.environ.get("SLURM_JOB_ID")
        if self.requested and job:
            log(f"Pre-empted: requeueing Slurm job {job}")
            subprocess.run(["scontrol", "requeue", job], check=False)
