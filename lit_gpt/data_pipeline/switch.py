"""The dataset in OUTPUT, replaced in one atomic step.

Layout (POSIX; rename of a symlink is atomic on local file systems, Lustre and NFS):
  OUTPUT/versions/V/{train,val}   complete datasets
  OUTPUT/current -> versions/V    the one pointer that a switch renames
  OUTPUT/train -> current/train   what users and TinyLlama readers open (--train_data_dir OUTPUT/train)
  OUTPUT/val   -> current/val
A switch first writes a journal (OUTPUT/.switch.json, naming the complete new version), then moves the staged
dataset into versions/, renames the `current` pointer, and removes the old version and the staging area. A run
that finds the journal finishes these steps (each can be repeated), so after a kill at any point the next run
ends with the complete new dataset; a kill before the journal leaves the old one untouched. A dataset of the
older layout (real OUTPUT/train and OUTPUT/val directories) is moved aside split by split during its first
switch; only during that one migration can a reader see one split missing.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from lit_gpt.checkpoint.publish import fsync_dir, point_symlink, write_atomically

VERSIONS, CURRENT, JOURNAL = "versions", "current", ".switch.json"
LINKS = ("train", "val")
CRASH_ENV = "LLAMMLEIN_PREPARE_CRASH_AT"  # tests: os._exit at the n-th boundary (1-based) of this process
_boundaries = [0]


def boundary(what: str) -> None:
    """A point after a durable file system change; a kill here must leave a recoverable state."""
    _boundaries[0] += 1
    if os.environ.get(CRASH_ENV) == str(_boundaries[0]):
        print(f"crash injected at boundary {_boundaries[0]} ({what})", flush=True)
        os._exit(86)


def _point(link: Path, target: str) -> None:
    if point_symlink(link, target):
        boundary(f"{link.name} -> {target}")


def current_version(out: Path) -> str | None:
    link = out / CURRENT
    return Path(os.readlink(link)).name if link.is_symlink() else None


def install(out: Path, staged: Path, version: str) -> None:
    """Replace the dataset in `out` by the complete one in `staged` (see the module docstring)."""
    write_atomically(out / JOURNAL, json.dumps({"version": version, "staged": str(staged)}).encode("utf-8"))
    fsync_dir(out)
    boundary("journal written")
    _roll_forward(out, version, staged)


def recover(out: Path) -> str | None:
    """Finish a switch that a kill interrupted; the version it installed, or None when there was none."""
    try:
        journal = json.loads((out / JOURNAL).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    _roll_forward(out, journal["version"], Path(journal["staged"]))
    return journal["version"]


def _roll_forward(out: Path, version: str, staged: Path) -> None:
    versions = out / VERSIONS
    target = versions / version
    if not target.is_dir():
        versions.mkdir(exist_ok=True)
        staged.rename(target)
        fsync_dir(versions)
        boundary("new version moved into place")
    _point(out / CURRENT, f"{VERSIONS}/{version}")
    for split in LINKS:
        link = out / split
        if link.exists() and not link.is_symlink():  # the older layout: a real directory
            aside = versions / "previous-layout"
            aside.mkdir(exist_ok=True)
            link.rename(aside / split)
            boundary(f"old {split} moved aside")
        _point(link, f"{CURRENT}/{split}")
    for old in sorted(versions.iterdir()):
        if old.name != version:
            shutil.rmtree(old)
            boundary(f"old version {old.name} removed")
    staging = staged.parent
    if staging.exists() and staging != out:
        shutil.rmtree(staging)
        boundary("staging removed")
    (out / JOURNAL).unlink(missing_ok=True)
    fsync_dir(out)
    boundary("journal removed")
