"""The layout of a training run's directory (`--out_dir`); the one place that spells its file names.

    iter-{step:08d}-ckpt.pth    checkpoints: a file (full) or a directory (sharded); `.tmp`/`.old` while written
    hparams.json                the resolved hyperparameters
    model_config.json           the model config (what an export needs besides the weights)
    tokenizer/                  a copy of the tokenizer the run trained with
    metrics.jsonl, metrics.csv  the run's metrics records
    tensorboard/, wandb_run_id  the loggers' files
    datapoints/                 which samples each step trained on
    profile/                    torch.profiler traces
    evals/                      benchmark scores of the checkpoints (lit_gpt.benchmarks) and their Slurm jobs' logs
    NAME.replaced, NAME.abandoned   records and checkpoints set aside by a resume (kept, never deleted)

Nothing here imports torch.
"""
from __future__ import annotations

import re
from pathlib import Path

CHECKPOINT_PATTERN = re.compile(r"^iter-(\d{8})-ckpt\.pth$")
CHECKPOINT_LEFTOVER = re.compile(r"^(iter-\d{8}-ckpt\.pth)\.(tmp|old)$")  # of a save that crashed
REPLACED = "replaced"  # suffix of records a resumed run replaces (metrics, datapoint logs)
ABANDONED = "abandoned"  # suffix of checkpoints after the step a run resumed from


def checkpoint_step(path: Path) -> int:
    """The optimizer step in a checkpoint's name; ValueError for any other name."""
    match = CHECKPOINT_PATTERN.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path}: not a checkpoint name of the form iter-XXXXXXXX-ckpt.pth")
    return int(match.group(1))


class RunDir:
    """Paths inside one run directory; creates nothing."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @classmethod
    def of_checkpoint(cls, checkpoint: Path) -> RunDir:
        """The run directory a checkpoint lies in (its files sit beside it)."""
        return cls(Path(checkpoint).parent)

    def checkpoint(self, step: int) -> Path:
        return self.path / f"iter-{step:08d}-ckpt.pth"

    def checkpoints(self) -> list[Path]:
        """Everything named like a checkpoint, oldest first (complete or not: see lit_gpt.checkpoint.find)."""
        if not self.path.is_dir():
            return []
        return sorted((p for p in self.path.iterdir() if CHECKPOINT_PATTERN.match(p.name)), key=checkpoint_step)

    def checkpoint_leftovers(self) -> list[Path]:
        """The checkpoints whose save (or swap) a crash interrupted: their `.tmp`/`.old` names with the suffix cut."""
        if not self.path.is_dir():
            return []
        return sorted({self.path / m.group(1) for p in self.path.iterdir() if (m := CHECKPOINT_LEFTOVER.match(p.name))})

    @property
    def hparams(self) -> Path:
        return self.path / "hparams.json"

    @property
    def model_config(self) -> Path:
        return self.path / "model_config.json"

    @property
    def tokenizer(self) -> Path:
        return self.path / "tokenizer"

    @property
    def metrics_jsonl(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def metrics_csv(self) -> Path:
        return self.path / "metrics.csv"

    tensorboard_name = "tensorboard"

    @property
    def tensorboard(self) -> Path:
        return self.path / self.tensorboard_name

    @property
    def wandb_run_id(self) -> Path:
        return self.path / "wandb_run_id"

    @property
    def datapoints(self) -> Path:
        return self.path / "datapoints"

    @property
    def profile(self) -> Path:
        return self.path / "profile"

    @property
    def evals(self) -> Path:
        return self.path / "evals"

    @property
    def eval_job_logs(self) -> Path:
        return self.evals / "logs"


def remove_empty_dirs(root: Path) -> None:
    """Remove the empty directories under `root` and `root` itself if it ends up empty (what a failed start made)."""
    for path in sorted((p for p in [root, *root.rglob("*")] if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if not any(path.iterdir()):
            path.rmdir()
