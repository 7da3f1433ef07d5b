"""Training checkpoints: atomic, verified save, rotation, discovery and (elastic) load.

Both layouts go through torch's strategy-agnostic state-dict API (`torch.distributed.checkpoint.state_dict`), so
one code path serves a single device, DDP, FSDP and FSDP2, keys are always the plain lit-gpt names, and a
checkpoint written by N ranks loads on M ranks:

- "full": one file `iter-{step:08d}-ckpt.pth`, a `torch.save` dict
  {"model", "optimizer", **meta}, written by rank 0;
- "sharded": a directory of the same name holding a torch distributed checkpoint ("model", "optimizer"),
  `meta.pt` with the non-tensor training state and `checksums.sha256`.

Each is first written under a `.tmp` name and renamed only when complete, so a crash mid-save never damages
the previous checkpoint and a name without `.tmp` is always complete. A failed write (a full disk) stops every rank
with one `SaveError`, removes the partial checkpoint and keeps the earlier ones.

Every checkpoint is verified (see `lit_gpt.integrity`) before it is loaded, before rotation deletes older ones
(rotation never deletes the newest checkpoint that verifies) and when `latest_checkpoint` picks one to resume from
(a damaged newer one is skipped with a warning). With several ranks, rank 0 verifies and every rank gets its
verdict, so that all of them take the same checkpoint or stop with the same error.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from lit_gpt import integrity
from lit_gpt.errors import InputError
from lit_gpt.integrity import DamagedError
from lit_gpt.original_checkpoint import is_original_state, load_optimizer_state, load_original_checkpoint

CKPT_PATTERN = re.compile(r"^iter-(\d{8})-ckpt\.pth$")
LEFTOVER_PATTERN = re.compile(r"^iter-\d{8}-ckpt\.pth\.(tmp|old)$")  # of a save that crashed
META_FILE = "meta.pt"
_noted_unverified: set[Path] = set()


class SaveError(RuntimeError):
    """A checkpoint could not be written (e.g. the disk is full); raised on every rank, names the path."""


def _log(message: str) -> None:
    if _is_rank_zero():
        print(message, file=sys.stderr)


def checkpoint_path(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / f"iter-{step:08d}-ckpt.pth"


def checkpoint_step(path: Path) -> int:
    match = CKPT_PATTERN.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path}: not a checkpoint name of the form iter-XXXXXXXX-ckpt.pth")
    return int(match.group(1))


def _is_complete(path: Path) -> bool:
    if path.is_file():
        return path.stat().st_size > 0
    return (path / META_FILE).is_file() and (path / ".metadata").is_file()


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints in `out_dir`, oldest first (not verified: see `latest_checkpoint`)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = [p for p in out_dir.iterdir() if CKPT_PATTERN.match(p.name) and _is_complete(p)]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(out_dir: Path, verify: bool = True, log: Callable[[str], None] = _log) -> Path | None:
    """The newest checkpoint in `out_dir` that verifies (collective with several ranks); damaged newer ones are
    skipped with a warning naming them. `verify=False`: the newest complete one, unchecked (no reading, no ranks)."""
    found = list_checkpoints(out_dir)
    if not verify:
        return found[-1] if found else None
    return _decided_by_rank_zero(lambda: _newest_that_verifies(found, log))


def verify_checkpoint(path: Path, log: Callable[[str], None] = _log) -> bool:
    """Raise DamagedError (on every rank) if the checkpoint is damaged; False, with a note, if it has no checksums."""
    verified = _decided_by_rank_zero(lambda: integrity.verify_checkpoint(path))
    if not verified:
        _note_unverified(path, log)
    return verified


def _newest_that_verifies(found: list[Path], log: Callable[[str], None]) -> Path | None:
    for path in reversed(found):
        try:
            if not integrity.verify_checkpoint(path):
                _note_unverified(path, log)
            return path
        except DamagedError as e:
            log(f"warning: passing over a damaged checkpoint: {e}")
    return None


def _note_unverified(path: Path, log: Callable[[str], None]) -> None:
    if Path(path) not in _noted_unverified:  # once: a resume looks it up, then loads it
        _noted_unverified.add(Path(path))
        log(f"note: {path} has no checksums (written before they were recorded); it is used unverified")


def _decided_by_rank_zero(decide: Callable[[], Any]) -> Any:
    """decide() on rank 0; its result, or its exception, on every rank."""
    if not dist.is_initialized():
        return decide()
    outcome = [None]
    if dist.get_rank() == 0:
        try:
            outcome = [(True, decide())]
        except Exception as e:  # re-raised below on every rank, not only here (the others would wait forever)
            outcome = [(False, e)]
    dist.broadcast_object_list(outcome, src=0)
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


def _unwrap(model, optimizer):
    """Strip Fabric's wrappers: the state-dict API needs the (DDP/FSDP) module and the torch optimizer."""
    model = getattr(model, "_forward_module", model)
    optimizer = getattr(optimizer, "optimizer", optimizer)
    return model, optimizer


def _is_rank_zero() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _fsync_path(path: Path) -> None:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())


def save_checkpoint(path: Path, model, optimizer, meta: dict[str, Any], state_dict_type: str, keep_last: int = 0) -> None:
    """Write a checkpoint atomically (collective: every rank must call it); keep the newest `keep_last` (0: all)."""
    path = Path(path)
    if state_dict_type not in ("full", "sharded"):
        raise ValueError(f"state_dict_type must be 'full' or 'sharded', got {state_dict_type!r}")
    tmp = path.with_name(path.name + ".tmp")
    model, optimizer = _unwrap(model, optimizer)
    if _is_rank_zero():
        path.parent.mkdir(parents=True, exist_ok=True)
        for leftover in path.parent.iterdir():  # of saves that crashed, this step's or another's
            if LEFTOVER_PATTERN.match(leftover.name):
                replaced = leftover.with_suffix("")
                if leftover.suffix == ".old" and not replaced.exists():  # killed while swapping: the old one is whole
                    leftover.rename(replaced)
                else:
                    _remove(leftover)
    _barrier()
    error, digests = None, {}
    if state_dict_type == "full":
        on_cuda = next(model.parameters()).is_cuda
        options = StateDictOptions(full_state_dict=True, cpu_offload=on_cuda)
        model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
        if _is_rank_zero():
            error = _attempt(path, tmp, lambda: _save_full(tmp, {"model": model_sd, "optimizer": optim_sd, **meta}))
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        try:
            written = dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=tmp)
            error = _attempt(path, tmp, lambda: digests.update(_hash_my_shards(tmp, written)))
        except (CheckpointException, OSError) as e:  # dcp raises on every rank when any rank failed
            error = _describe_failure(path, tmp, e)
    reports = integrity.gather((error, digests))
    errors = [e for e, _ in reports if e]
    all_digests = {name: digest for _, shard_digests in reports for name, digest in shard_digests.items()}
    if not errors and _is_rank_zero():
        error = _attempt(path, tmp, lambda: _publish(path, tmp, state_dict_type, meta, all_digests))
        errors = [error] if error else []
    errors = _decided_by_rank_zero(lambda: errors)
    if errors:
        if _is_rank_zero():
            _remove(tmp)
        raise SaveError(errors[0])
    if keep_last > 0 and _is_rank_zero():
        try:
            _rotate(path.parent, keep_last)
        except OSError as e:  # the new checkpoint is in place; failing to delete old ones loses nothing
            _log(f"warning: could not delete old checkpoints in {path.parent}: {e}")
    _barrier()


def _save_full(tmp: Path, state: dict) -> None:
    try:
        with _crc32_on():  # the CRCs are what verification checks
            torch.save(state, tmp)
    except RuntimeError as e:
        # torch.save reports a failed write (a full disk) as an "iostream error" without the errno: one more write
        # to the same file tells what is wrong.
        try:
            with open(tmp, "ab") as f:
                f.write(bytes(1 << 20))
                f.flush()
                os.fsync(f.fileno())
        except OSError as write_error:
            raise write_error from e
        raise


@contextmanager
def _crc32_on() -> Iterator[None]:
    """torch.save with a CRC-32 per record (torch's default, which a user can switch off)."""
    try:
        from torch.utils.serialization import config
    except ImportError:  # a torch without the switch always writes them
        yield
        return
    with config.patch({"save.compute_crc32": True}):
        yield


def _attempt(path: Path, tmp: Path, write: Callable[[], Any]) -> str | None:
    """Run `write`; None, or what went wrong as a message for every rank."""
    try:
        write()
    except Exception as e:  # torch wraps I/O errors in RuntimeErrors; every failure must reach every rank
        return _describe_failure(path, tmp, e)
    return None


def _describe_failure(path: Path, tmp: Path, e: BaseException) -> str:
    os_error = _os_error_in(e)
    if os_error is not None and os_error.errno in (errno.ENOSPC, errno.EDQUOT):
        reason = f"no space left on device ({os_error.filename or tmp})"
    elif os_error is not None:
        reason = f"{os_error.strerror or os_error} ({os_error.filename or tmp})"
    else:
        reason = f"{type(e).__name__}: {str(e).strip()[:500]}"
    return f"{path}: cannot save the checkpoint: {reason}; the partial checkpoint was removed, earlier ones are kept"


def _os_error_in(e: BaseException | None) -> OSError | None:
    """The OSError behind `e`: itself, in its chain of causes, or in any rank's failure of a CheckpointException."""
    while e is not None and not isinstance(e, OSError):
        if isinstance(e, CheckpointException):
            failures = [f[0] if isinstance(f, tuple) else f for f in e.failures.values()]
            return next(filter(None, map(_os_error_in, failures)), None)
        e = e.__cause__ or e.__context__
    return e


def _hash_my_shards(tmp: Path, written) -> dict[str, str]:
    """sha256 of this rank's share of the shard files (every rank knows them all from the returned metadata)."""
    names = sorted({info.relative_path for info in (written.storage_data or {}).values()})
    rank, world_size = integrity.rank_and_world_size()
    mine = names[rank::world_size]
    return dict(zip(mine, integrity.in_threads(lambda name: integrity.sha256_file(tmp / name), mine)))


def _publish(path: Path, tmp: Path, state_dict_type: str, meta: dict, digests: dict[str, str]) -> None:
    """Rank 0: complete the temporary checkpoint and rename it into place."""
    if state_dict_type == "sharded":
        torch.save(meta, tmp / META_FILE)
        for name in (META_FILE, ".metadata"):
            digests[name] = integrity.sha256_file(tmp / name)
        integrity.write_checksums(tmp, digests)  # inside the directory: published by the same rename
    _fsync_path(tmp)
    if path.exists():  # re-saving the same step: swap in the new one only once it is complete
        old = path.with_name(path.name + ".old")
        _remove(old)
        path.rename(old)
        tmp.rename(path)
        _remove(old)
    else:
        tmp.rename(path)
    if state_dict_type == "sharded":
        integrity.mark_verified(path)  # its checksums were just computed from the files on disk


def _rotate(out_dir: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints, but never the newest one that verifies."""
    found = list_checkpoints(out_dir)
    stale = found[:-keep_last]
    if not stale:
        return
    keep = _newest_that_verifies(found, _log)
    for old in stale:
        if old != keep:
            _remove(old)
        else:
            _log(f"warning: keeping {old} beyond --keep_last_checkpoints {keep_last}: every newer checkpoint is damaged")


def load_checkpoint(path: Path, model, optimizer=None) -> dict[str, Any]:
    """Verify, then load model (and optimizer) state in place on every rank; returns the training metadata.

    Works across world sizes and strategies: the sharded layout is resharded by torch distributed checkpoint, the
    full layout is read by every rank (memory-mapped) and scattered to the current sharding.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--resume {path}: no such checkpoint")
    if path.is_dir() and not _is_complete(path):
        raise InputError(f"--resume {path}: incomplete sharded checkpoint (missing {META_FILE} or .metadata)")
    verify_checkpoint(path)
    model, optimizer = _unwrap(model, optimizer)
    if path.is_file():
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("model"), dict) and is_original_state(state["model"]):
            return _load_original(path, model, optimizer)
        model_sd, optim_sd = state.pop("model"), state.pop("optimizer", None)
        _apply_state(model, optimizer, model_sd, optim_sd, StateDictOptions(full_state_dict=True))
        return state
    # DCP loads in place into state dicts shaped like the current (possibly differently sharded) model.
    model_sd = get_model_state_dict(model)
    target = {"model": model_sd}
    if optimizer is not None:
        target["optimizer"] = get_optimizer_state_dict(model, optimizer)
    dcp.load(target, checkpoint_id=path)
    _apply_state(model, optimizer, target["model"], target.get("optimizer"), StateDictOptions())
    return torch.load(path / META_FILE, map_location="cpu", weights_only=True)


def _load_original(path: Path, model, optimizer) -> dict[str, Any]:
    """A checkpoint of the original TinyLlama/LLäMmlein trainer (see lit_gpt.original_checkpoint): weights and AdamW
    moments under our names; returns its counters with "original": True (it has no data position or RNG state)."""
    original = load_original_checkpoint(path, with_optimizer=optimizer is not None)
    set_model_state_dict(model, original.model, options=StateDictOptions(full_state_dict=True))
    if optimizer is not None and original.optimizer is not None:  # None: it never stepped, a fresh state is the same
        load_optimizer_state(model, optimizer, original.optimizer)
    return {"original": True, "step_count": original.step_count, "iter_num": original.iter_num,
            "hparams": original.hparams}


def _apply_state(model, optimizer, model_sd, optim_sd, options: StateDictOptions) -> None:
    set_model_state_dict(model, model_sd, options=options)
    if optimizer is not None:
        if optim_sd is None:
            raise ValueError("the checkpoint holds no optimizer state")
        set_optimizer_state_dict(model, optimizer, optim_sd, options=options)
