"""Files that appear under their final name only when complete: write a hidden temporary file, fsync, rename."""
from __future__ import annotations

import os
from pathlib import Path


def write_atomically(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def set_aside(path: Path, suffix: str) -> Path:
    """Rename `path` to `NAME.suffix` (or `NAME.suffix-2`, ... if taken): kept, never overwritten or deleted."""
    path = Path(path)
    aside = path.with_name(f"{path.name}.{suffix}")
    n = 1
    while aside.exists() or aside.is_symlink():
        n += 1
        aside = path.with_name(f"{path.name}.{suffix}-{n}")
    path.rename(aside)
    return aside
