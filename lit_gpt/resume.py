"""Resume policy: which checkpoint a run continues from, whether it can, and what happens to later checkpoints.

Every check here runs before anything in the run directory changes, so a refusal leaves the run as it was.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lit_gpt.checkpoint.find import latest_checkpoint, list_checkpoints, verify_checkpoint
from lit_gpt.checkpoint.layout import DCP_METADATA_FILE, META_FILE
from lit_gpt.checkpoint.publish import set_aside
from lit_gpt.errors import InputError
from lit_gpt.run_dir import ABANDONED, checkpoint_step

# What a checkpoint of this trainer records besides the weights and optimizer state
TRAINING_STATE_KEYS = ("step_count", "iter_num", "tokens_seen", "world_size", "rng", "data")


@dataclass
class Progress:
    """Where the run is: what a checkpoint carries besides model, optimizer and RNG states."""

    step: int = 0  # optimizer steps taken
    iter_num: int = 0  # micro-batches per rank so far
    tokens_seen: int = 0  # real (non-padding) tokens of all ranks
    skipped: int = 0  # steps whose update was skipped (non-finite loss or gradient)

    def state_dict(self) -> dict:
        """The checkpoint's keys for it (those the original TinyLlama trainer used, where it had them)."""
        return {"step_count": self.step, "iter_num": self.iter_num, "tokens_seen": self.tokens_seen,
                "skipped_steps": self.skipped}


def check_out_dir(out_dir: Path, resume: str) -> None:
    """Without --resume, refuse an out_dir that already holds checkpoints: a fresh run would mix its checkpoints
    with the old run's, and rotation would delete the new ones. A named --resume must exist."""
    if resume and resume != "auto" and not Path(resume).exists():
        raise InputError(f"--resume {resume}: no such checkpoint")
    if resume and resume != "auto" and Path(resume).is_dir() and \
            not any((Path(resume) / name).exists() for name in (META_FILE, DCP_METADATA_FILE)):
        # e.g. an exported Hugging Face model: said before verification calls it a checkpoint without checksums
        raise InputError(f"--resume {resume}: not a checkpoint of this trainer (a directory without {META_FILE} or "
                         f"{DCP_METADATA_FILE}; an exported model?); to start from a converted model's weights use "
                         f"--init_from")
    if not resume and (newest := latest_checkpoint(out_dir, verify=False)) is not None:
        raise InputError(f"--out_dir {out_dir}: holds checkpoints of an earlier run (newest: {newest.name}); pass "
                         f"--resume auto to continue it, or choose another --out_dir")


def resume_checkpoint(resume: str, out_dir: Path, verify: bool = True, allow_unverified: bool = False) -> Path | None:
    """The checkpoint that --resume (empty, `auto` or a path) names, if any. `verify` (collective): `auto` takes the
    newest in `out_dir` that verifies, a named one must verify; one without checksums counts only with
    `allow_unverified` (--allow_unverified)."""
    if resume == "auto":
        return latest_checkpoint(Path(out_dir), verify=verify, allow_unverified=allow_unverified)
    path = Path(resume) if resume else None
    if path is not None and verify:
        try:
            verify_checkpoint(path, allow_unverified=allow_unverified)
        except InputError as e:  # damaged or unverifiable: the message names the file
            raise InputError(f"--resume: {e}") from None
    return path


def check_resumable(ckpt: dict, path: Path, *, global_batch_size: int, data_fingerprint: str, train_data_dir: str,
                    stop_at_step: int, max_steps: int) -> tuple[int, int, int, int]:
    """(step, micro-iterations, tokens seen, skipped steps) of a loaded checkpoint of this trainer, after checking
    that a run with these settings and data (`data_fingerprint`: the training data's manifest) can continue it."""
    missing = [key for key in TRAINING_STATE_KEYS if key not in ckpt]
    if missing:
        raise InputError(f"--resume {path}: not a checkpoint of this trainer (no {', '.join(missing)}); to start from "
                         f"its weights with a fresh optimizer use --init_from")
    data = ckpt["data"]
    if data["global_batch_size"] != global_batch_size:
        raise InputError(f"--global_batch_size {global_batch_size} differs from the checkpoint's "
                         f"{data['global_batch_size']}: the sample position would not map to a step")
    logged = data["manifest"]["fingerprint"]
    if logged != data_fingerprint:
        raise InputError(f"--train_data_dir {train_data_dir}: {path} was trained on other data or with other "
                         f"order settings (data fingerprint {logged[:12]}, now {data_fingerprint[:12]}); resuming "
                         f"would mix two sample orders")
    step = ckpt["step_count"]
    if 0 < stop_at_step <= step < max_steps:
        # `step == stop_at_step` would never hold again: the run would silently train on to max_steps.
        raise InputError(f"--stop_at_step {stop_at_step}: the checkpoint is already at step {step}; "
                         f"pass a later --stop_at_step, or 0 to train to the end")
    return step, ckpt["iter_num"], ckpt["tokens_seen"], ckpt.get("skipped_steps", 0)


def check_original_resumable(ckpt: dict, path: Path, *, global_batch_size: int, block_size: int, stop_at_step: int,
                             max_steps: int, log: Callable[[str], None]) -> tuple[int, int, int, int]:
    """The counters for a run continued from the original TinyLlama/LLäMmlein trainer's checkpoint (weights and
    AdamW state are loaded). It holds no data position: the run goes on at its step count on this toolkit's order."""
    step, theirs = ckpt["step_count"], ckpt["hparams"].get("global_batch_size")
    if theirs is not None and theirs != global_batch_size:
        raise InputError(f"--global_batch_size {global_batch_size} differs from the original run's {theirs} "
                         f"({path}): its step count would mean another number of samples")
    if 0 < stop_at_step <= step < max_steps:
        raise InputError(f"--stop_at_step {stop_at_step}: the checkpoint is already at step {step}")
    log(f"{path} was written by the original TinyLlama/LLäMmlein trainer: its weights, AdamW state and step "
        f"count ({step}) carry over; its data order cannot, so training continues at step {step} of this "
        f"toolkit's order over --train_data_dir (sample position {step * global_batch_size:,}).")
    return step, ckpt["iter_num"], step * global_batch_size * block_size, 0


def set_aside_checkpoints_after(out_dir: Path, step: int, log: Callable[[str], None]) -> None:
    """Rename the checkpoints later than the resumed `step` to `*.abandoned` (kept, never deleted).

    They belong to the continuation this run replaces (its metrics and datapoint logs are dropped too); left in
    place, the next `--resume auto` (e.g. after a pre-emption) would pick the newest of them over this run's own."""
    for later in list_checkpoints(out_dir):
        if checkpoint_step(later) > step:
            aside = set_aside(later, ABANDONED)
            log(f"Set aside {later.name} (after the resumed step {step}) as {aside.name}")
