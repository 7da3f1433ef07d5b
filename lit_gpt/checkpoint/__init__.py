"""Checkpoints: save, load, verify, rotate and publish atomically.

    layout    shared names: META_FILE, CHECKSUM_FILE, clean_key, the errors (CheckpointError, DamagedError, SaveError)
    publish   the one atomic-publish helper (files, directories, symlinks, set_aside); no torch
    verify    integrity: CRC-32s of full checkpoints, sha256 of sharded ones and of data chunks; no torch
    ranks     collective decisions (rank 0 decides, every rank gets the verdict)
    find      which checkpoints a run directory holds, the newest that verifies
    save      atomic, verified training checkpoints (full or sharded) and rotation
    async_save  sharded ones written in the background (torch's async save), published when every rank is done
    original  the original TinyLlama/LLäMmlein trainer's checkpoints, read as ours
    load      load_training_state (resume) and load_weights (export, generation, --init_from), configs, tokenizers

The names below are imported on first use, so that `lit_gpt.checkpoint.publish` and `.verify` stay free of torch for
the commands that need no model (data preparation, run records).
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "layout": ("CHECKSUM_FILE", "META_FILE", "CheckpointError", "DamagedError", "SaveError", "clean_key"),
    "publish": ("atomic_output_dir", "open_atomically", "point_symlink", "remove_stale_temp_dirs", "replace_path",
                "roll_forward", "set_aside", "write_atomically"),
    "verify": ("check_checkpoint", "sha256_file"),
    "find": ("latest_checkpoint", "list_checkpoints", "verify_checkpoint"),
    "save": ("save_checkpoint",),
    "async_save": ("AsyncCheckpointer",),
    "original": ("is_original_checkpoint", "load_original_checkpoint"),
    "load": ("LazyStateDict", "load_gpt", "load_training_state", "load_weights", "resolve_config"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
