"""Training checkpoints: atomic save, rotation, discovery and (elastic) load.

Both layouts go through torch's strategy-agnostic state-dict API (`torch.distributed.checkpoint.state_dict`), so
one code path serves a single device, DDP, FSDP and FSDP2, keys are always the plain lit-gpt names, and a
checkpoint written by N ranks loads on M ranks:

- "full": one file `iter-{step:08d}-ckpt.pth`, a `torch.save` dict
  {"model", "optimizer", **meta}, written by rank 0;
- "sharded": a directory of the same name holding a torch distributed checkpoint ("model", "optimizer") plus
  `meta.pt` with the non-tensor training state.

Each is first written under a `.tmp` name and renamed only when complete, so a crash mid-save never damages
the previous checkpoint and a name without `.tmp` is always complete.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

CKPT_PATTERN = re.compile(r"^iter-(\d{8})-ckpt\.pth$")
META_FILE = "meta.pt"


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
    """Complete checkpoints in `out_dir`, oldest first."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = [p for p in out_dir.iterdir() if CKPT_PATTERN.match(p.name) and _is_complete(p)]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(out_dir: Path) -> Optional[Path]:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


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
    """Write a checkpoint atomically (collective: every rank must call it)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    model, optimizer = _unwrap(model, optimizer)
    if _is_rank_zero():
        _remove(tmp)  # a leftover from a crashed save
    _barrier()
    if state_dict_type == "full":
        on_cuda = next(model.parameters()).is_cuda
        options = StateDictOptions(full_state_dict=True, cpu_offload=on_cuda)
        model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
        if _is_rank_zero():
            torch.save({"model": model_sd, "optimizer": optim_sd, **meta}, tmp)
    elif state_dict_type == "sharded":
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=tmp)
        if _is_rank_zero():
            torch.save(meta, tmp / META_FILE)
    else:
        raise ValueError(f"state_dict_type must be 'full' or 'sharded', got {state_dict_type!r}")
    _barrier()
    if _is_rank_zero():
        _fsync_path(tmp)
        if path.exists():  # re-saving the same step: swap in the new one only once it is complete
            old = path.with_name(path.name + ".old")
            _remove(old)
            path.rename(old)
            tmp.rename(path)
            _remove(old)
        else:
            tmp.rename(path)
        if keep_last > 0:
            for stale in list_checkpoints(path.parent)[:-keep_last]:
                _remove(stale)
    _barrier()


def load_checkpoint(path: Path, model, optimizer=None) -> dict[str, Any]:
    """Load model (and optimizer) state in place on every rank; returns the training metadata.

    Works across world sizes and strategies: the sharded layout is resharded by torch distributed checkpoint, the
    full layout is read by every rank (memory-mapped) and scattered to the current sharding.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--resume {path}: no such checkpoint")
    model, optimizer = _unwrap(model, optimizer)
    if path.is_file():
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        model_sd, optim_sd = state.pop("model"), state.pop("optimizer", None)
        _apply_state(model, optimizer, model_sd, optim_sd, StateDictOptions(full_state_dict=True))
        return state
    if not _is_complete(path):
        raise ValueError(f"--resume {path}: incomplete sharded checkpoint (missing {META_FILE} or .metadata)")
    # DCP loads in place into state dicts shaped like the current (possibly differently sharded) model.
    model_sd = get_model_state_dict(model)
    target = {"model": model_sd}
    if optimizer is not None:
        target["optimizer"] = get_optimizer_state_dict(model, optimizer)
    dcp.load(target, checkpoint_id=path)
    _apply_state(model, optimizer, target["model"], target.get("optimizer"), StateDictOptions())
    return torch.load(path / META_FILE, map_location="cpu", weights_only=True)


def _apply_state(model, optimizer, model_sd, optim_sd, options: StateDictOptions) -> None:
    set_model_state_dict(model, model_sd, options=options)
    if optimizer is not None:
        if optim_sd is None:
            raise ValueError("the checkpoint holds no optimizer state")
        set_optimizer_state_dict(model, optimizer, optim_sd, options=options)
