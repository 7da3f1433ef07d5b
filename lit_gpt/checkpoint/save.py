"""Saving training checkpoints: atomic and verified, with rotation (loading: `lit_gpt.checkpoint.load`).

Both layouts go through torch's strategy-agnostic state-dict API (`torch.distributed.checkpoint.state_dict`), so
one code path serves a single device, DDP, FSDP and FSDP2, keys are always the plain lit-gpt names, and a
checkpoint written by N ranks loads on M ranks:

- "full": one file (named by `lit_gpt.run_dir.RunDir.checkpoint`), a `torch.save` dict
  {"model", "optimizer", **meta}, written by rank 0;
- "sharded": a directory of the same name holding a torch distributed checkpoint ("model", "optimizer"),
  `meta.pt` with the non-tensor training state and `checksums.sha256`.

Each is first written under a `.tmp` name and renamed only when complete (`lit_gpt.checkpoint.publish.replace_path`),
so a crash mid-save never damages
the previous checkpoint and a name without `.tmp` is always complete. A failed write (a full disk) stops every rank
with one `SaveError`, removes the partial checkpoint and keeps the earlier ones.

Every checkpoint is verified (see `lit_gpt.checkpoint.verify`) before it is loaded, before rotation deletes older ones
(rotation never deletes the newest checkpoint that verifies) and when `find.latest_checkpoint` picks one to resume from
(a damaged newer one is skipped with a warning). With several ranks, rank 0 verifies and every rank gets its
verdict, so that all of them take the same checkpoint or stop with the same error.
"""
from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

from lit_gpt.checkpoint import ranks, verify
from lit_gpt.checkpoint.find import list_checkpoints, newest_that_verifies
from lit_gpt.checkpoint.layout import DCP_METADATA_FILE, META_FILE, SaveError, unwrap
from lit_gpt.checkpoint.publish import remove, replace_path, roll_forward, temporary_name
from lit_gpt.run_dir import RunDir


def save_checkpoint(path: Path, model, optimizer, meta: dict[str, Any], state_dict_type: str, keep_last: int = 0) -> None:
    """Write a checkpoint atomically (collective: every rank must call it); keep the newest `keep_last` (0: all).
    `lit_gpt.checkpoint.async_save` writes sharded ones in the background through the same steps."""
    path = Path(path)
    if state_dict_type not in ("full", "sharded"):
        raise ValueError(f"state_dict_type must be 'full' or 'sharded', got {state_dict_type!r}")
    tmp = prepare_to_save(path)
    model, optimizer = unwrap(model, optimizer)
    error, digests = None, {}
    if state_dict_type == "full":
        on_cuda = next(model.parameters()).is_cuda
        options = StateDictOptions(full_state_dict=True, cpu_offload=on_cuda)
        model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
        if ranks.is_rank_zero():
            error = _attempt(path, tmp, lambda: _save_full(tmp, {"model": model_sd, "optimizer": optim_sd, **meta}))
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        try:
            written = dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=tmp)
            error = _attempt(path, tmp, lambda: digests.update(hash_my_shards(tmp, written)))
        except (CheckpointException, OSError) as e:  # dcp raises on every rank when any rank failed
            error = describe_failure(path, tmp, e)
    conclude_save(path, tmp, state_dict_type, meta, error, digests, keep_last)


def prepare_to_save(path: Path) -> Path:
    """Clean up after interrupted saves (collective); the temporary name to write the checkpoint `path` under."""
    if ranks.is_rank_zero():
        path.parent.mkdir(parents=True, exist_ok=True)
        for interrupted in RunDir(path.parent).checkpoint_leftovers():  # saves that crashed, this step's or another's
            roll_forward(interrupted)
    ranks.barrier()
    return temporary_name(path)


def conclude_save(path: Path, tmp: Path, state_dict_type: str, meta: dict[str, Any], error: str | None,
                  digests: dict[str, str], keep_last: int) -> None:
    """Collective, once every rank has written its part to `tmp`: with this rank's `error` (None: written) and the
    sha256 of its share of the shard files, publish the checkpoint and rotate, or raise one SaveError on every rank
    (the partial checkpoint removed, the earlier ones kept)."""
    reports = ranks.gather((error, digests))
    errors = [e for e, _ in reports if e]
    all_digests = {name: digest for _, shard_digests in reports for name, digest in shard_digests.items()}
    if not errors and ranks.is_rank_zero():
        error = _attempt(path, tmp, lambda: _publish(path, tmp, state_dict_type, meta, all_digests))
        errors = [error] if error else []
    errors = ranks.decided_by_rank_zero(lambda: errors)
    if errors:
        if ranks.is_rank_zero():
            remove(tmp)
        raise SaveError(errors[0])
    if keep_last > 0 and ranks.is_rank_zero():
        try:
            _rotate(path.parent, keep_last)
        except OSError as e:  # the new checkpoint is in place; failing to delete old ones loses nothing
            ranks.log(f"warning: could not delete old checkpoints in {path.parent}: {e}")
    ranks.barrier()


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
        return describe_failure(path, tmp, e)
    return None


def describe_failure(path: Path, tmp: Path, e: BaseException) -> str:
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


def hash_my_shards(tmp: Path, written) -> dict[str, str]:
    """sha256 of this rank's share of the shard files (every rank knows them all from the returned metadata)."""
    names = sorted({info.relative_path for info in (written.storage_data or {}).values()})
    rank, world_size = ranks.rank_and_world_size()
    mine = names[rank::world_size]
    return dict(zip(mine, verify.in_threads(lambda name: verify.sha256_file(tmp / name), mine)))


def _publish(path: Path, tmp: Path, state_dict_type: str, meta: dict, digests: dict[str, str]) -> None:
    """Rank 0: complete the temporary checkpoint and rename it into place."""
    if state_dict_type == "sharded":
        torch.save(meta, tmp / META_FILE)
        for name in (META_FILE, DCP_METADATA_FILE):
            digests[name] = verify.sha256_file(tmp / name)
        verify.write_checksums(tmp, digests)  # inside the directory: published by the same rename
    replace_path(path, tmp)
    if state_dict_type == "sharded":
        verify.mark_verified(path)  # its checksums were just computed from the files on disk


def _rotate(out_dir: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints, but never the newest one that verifies."""
    found = list_checkpoints(out_dir)
    stale = found[:-keep_last]
    if not stale:
        return
    keep = newest_that_verifies(found)
    for old in stale:
        if old != keep:
            remove(old)
        else:
            ranks.log(f"warning: keeping {old} beyond --keep_last_checkpoints {keep_last}: every newer checkpoint is damaged")
