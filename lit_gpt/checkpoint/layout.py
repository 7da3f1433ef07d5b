"""What every checkpoint module shares: the files inside a sharded checkpoint, the wrapper prefixes stripped from
parameter names, and the errors. Imports nothing of the project but its error base, so every module of the package can use it."""
from __future__ import annotations

from lit_gpt.errors import InputError

META_FILE = "meta.pt"  # a sharded checkpoint's non-tensor training state
DCP_METADATA_FILE = ".metadata"  # torch distributed checkpoint's own index
CHECKSUM_FILE = "checksums.sha256"  # sha256sum's format, over the sharded checkpoint's files
# Module wrappers that insert a name component: Fabric, torch.compile, activation checkpointing, FSDP1.
WRAPPER_PARTS = {"_forward_module", "_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module"}


class CheckpointError(InputError, ValueError):
    """Bad input to a conversion/generation script; the message names the file or flag."""


class DamagedError(InputError, ValueError):
    """A checkpoint or chunk whose bytes are not those that were written; the message names the file."""


class SaveError(RuntimeError):
    """A checkpoint (raised on every rank) or a run record (rank 0) could not be written, e.g. the disk is full;
    the message names the path and the cause."""


def clean_key(key: str) -> str:
    """A parameter name without the wrapper components (and a DDP module's leading `module.`)."""
    parts = [p for p in key.split(".") if p not in WRAPPER_PARTS]
    if parts and parts[0] == "module":
        parts = parts[1:]
    return ".".join(parts)


def unwrap(model, optimizer=None):
    """Strip Fabric's wrappers: the state-dict API needs the (DDP/FSDP) module and the torch optimizer."""
    return getattr(model, "_forward_module", model), getattr(optimizer, "optimizer", optimizer)
