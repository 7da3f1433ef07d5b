"""Experiment loggers for the trainer: TensorBoard (default) and Weights & Biases, through Lightning's loggers.

Both are written by rank 0 only and continue across resumes: TensorBoard hides the events an earlier run logged
after the step this run resumes from (it logs them again), and W&B keeps its run id in out_dir (`wandb_run_id`), so
a resumed or requeued job appends to the same W&B run. (metrics.jsonl/.csv, the run's own records, are
lit_gpt.metrics_log.)
"""
from __future__ import annotations

import secrets
import sys
import threading
from pathlib import Path
from typing import Any

from lit_gpt.checkpoint.layout import SaveError
from lit_gpt.checkpoint.publish import write_atomically
from lit_gpt.errors import os_error_in
from lit_gpt.run_dir import RunDir

LOGGERS = ("tensorboard", "wandb", "csv")  # csv: metrics.csv beside metrics.jsonl (lit_gpt.metrics_log)


class RunLoggers:
    def __init__(self, out_dir: Path, names: list[str], resume_step: int | None, enabled: bool,
                 wandb_options: dict[str, Any] | None = None) -> None:
        """`resume_step`: the step this run continues from (None for a fresh run); `enabled`: rank 0."""
        self.loggers: list = []
        self.out_dir = Path(out_dir)
        self.failure: str | None = None  # the first write that failed: nothing more is written after it
        if not enabled:
            return
        if "tensorboard" in names:
            from lightning.fabric.loggers import TensorBoardLogger

            _quiet_tensorboard_writer_thread()

            purge_step = resume_step + 1 if resume_step is not None else 0
            self.loggers.append(TensorBoardLogger(root_dir=str(out_dir), name=RunDir.tensorboard_name, version="",
                                                  purge_step=purge_step))
        if "wandb" in names:
            self.loggers.append(_wandb_logger(Path(out_dir), fresh=resume_step is None, **(wandb_options or {})))

    def log(self, metrics: dict[str, float], step: int) -> None:
        for logger in self.loggers:
            self._write(logger, "log_metrics", metrics, step)

    def log_hparams(self, hparams: dict[str, Any]) -> None:
        for logger in self.loggers:
            self._write(logger, "log_hyperparams", hparams)

    def _write(self, logger, method: str, *args) -> None:
        """logger.method(*args); a failed write (a full disk) is one SaveError naming the logger's files and the
        cause, and the last: nothing more is written."""
        if self.failure is not None:
            return
        try:
            getattr(logger, method)(*args)
        except Exception as e:  # Lightning re-raises the writer's OSError as a ValueError
            os_error = os_error_in(e)
            if os_error is None:
                raise
            self.failure = (f"{self._files_of(logger)}: cannot write the {type(logger).__name__.removesuffix('Logger')} "
                            f"log: {os_error.strerror or os_error}")
            raise SaveError(self.failure) from None

    def _files_of(self, logger) -> Path:
        return RunDir(self.out_dir).tensorboard if type(logger).__name__ == "TensorBoardLogger" else self.out_dir

    def close(self) -> None:
        """Flush and close: the last events reach the disk (or W&B) even when the run stops early."""
        for logger in self.loggers:
            try:
                self._write(logger, "finalize", "success")
            except SaveError as e:  # the run itself ended; its last events could not be kept
                print(f"error: {e}", file=sys.stderr)
        if any(type(logger).__name__ == "WandbLogger" for logger in self.loggers):
            import wandb

            wandb.finish()


def _quiet_tensorboard_writer_thread() -> None:
    """TensorBoard writes in a thread that prints its exception (a full disk) as a traceback and leaves it to be
    raised again in the trainer's thread at the next write, where it is reported as one line: only that print is
    left out."""
    previous = threading.excepthook
    if getattr(previous, "quiet_tensorboard", False):
        return

    def hook(args) -> None:
        if not (type(args.thread).__name__ == "_AsyncWriterThread" and isinstance(args.exc_value, OSError)):
            previous(args)

    hook.quiet_tensorboard = True
    threading.excepthook = hook


def _wandb_logger(out_dir: Path, fresh: bool, project: str, name: str, entity: str, tags: list[str]):
    """A WandbLogger whose run id lives in out_dir: a resumed run (any job, any world size) appends to the same run."""
    from lightning.pytorch.loggers import WandbLogger

    id_file = RunDir(out_dir).wandb_run_id
    run_id = None if fresh or not id_file.is_file() else id_file.read_text().strip()
    if run_id is None:  # W&B accepts any id of [a-z0-9]; wandb's own generator moved between releases
        run_id = secrets.token_hex(8)
        write_atomically(id_file, (run_id + "\n").encode())
    return WandbLogger(project=project, name=name or out_dir.resolve().name, entity=entity or None,
                       tags=tags or None, id=run_id, resume="allow", save_dir=str(out_dir))
