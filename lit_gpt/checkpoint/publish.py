"""The one way this project publishes a result: it appears under its final name only when complete.

- `write_atomically` / `open_atomically`: a file (hidden temporary beside it, fsync, rename);
- `replace_path`: a complete temporary file or directory renamed into place, swapping out one that is there; a kill
  mid-swap leaves `NAME.old`, which `roll_forward` puts back (checkpoints);
- `atomic_output_dir`: a directory built in a temporary beside the target and published only if the block succeeds
  (exports, converted models); temporaries of killed processes are cleaned up by `remove_stale_temp_dirs`;
- `point_symlink`: a symlink re-pointed by one rename (the prepared-data switch, which journals its steps and rolls
  forward itself);
- `set_aside`: keep an old file or directory under `NAME.suffix` instead of deleting it; `keep_aside`: the same for
  a file about to be replaced atomically (run records), without a moment where it is missing.

Nothing here imports torch: data preparation and run records use it too.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from lit_gpt.checkpoint.layout import CheckpointError


# ------------------------------------------------------------------ files
@contextmanager
def open_atomically(path: Path, mode: str = "wb", **kwargs) -> Iterator[IO]:
    """An open temporary file that becomes `path` when the block ends without error (else it is removed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def check_output_path(path: Path, flag: str) -> None:
    """Refuse an output path that cannot be looked up (a symlink loop, a file as a parent) or is a dangling symlink,
    up front: pathlib calls such a path absent, and the first write would fail with a traceback."""
    try:
        os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise CheckpointError(f"{flag} {path}: a symlink to {os.readlink(path)}, which does not exist") from None
    except OSError as e:  # ELOOP, ENOTDIR, ENAMETOOLONG, EACCES
        raise CheckpointError(f"{flag} {path}: {e.strerror}") from None


def write_atomically(path: Path, data: bytes) -> None:
    with open_atomically(path) as f:
        f.write(data)


def set_aside(path: Path, suffix: str) -> Path:
    """Rename `path` to `NAME.suffix` (or `NAME.suffix-2`, ... if taken): kept, never overwritten or deleted."""
    aside = _free_aside_name(Path(path), suffix)
    Path(path).rename(aside)
    return aside


def keep_aside(path: Path, suffix: str) -> Path | None:
    """Keep the file `path` also as `NAME.suffix` (`-2`, ...), leaving it in place to be replaced atomically: the
    old content is never absent from both names. A hard link (a copy where the filesystem has none); None when the
    file is already linked elsewhere (kept by an earlier attempt that a kill interrupted)."""
    path = Path(path)
    if path.stat().st_nlink > 1:
        return None
    aside = _free_aside_name(path, suffix)
    try:
        os.link(path, aside)
    except OSError:  # no hard links here (some network and FUSE filesystems)
        write_atomically(aside, path.read_bytes())
    fsync_dir(path.parent)
    return aside


def _free_aside_name(path: Path, suffix: str) -> Path:
    aside = path.with_name(f"{path.name}.{suffix}")
    n = 1
    while aside.exists() or aside.is_symlink():
        n += 1
        aside = path.with_name(f"{path.name}.{suffix}-{n}")
    return aside


def remove(path: Path) -> None:
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def fsync_tree(path: Path) -> None:
    """fsync a file, or every file under a directory."""
    path = Path(path)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())


def fsync_dir(path: Path) -> None:
    """Make the renames inside directory `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------ replacing in place
def temporary_name(path: Path) -> Path:
    """Where `replace_path` expects the complete new version of `path`."""
    return Path(path).with_name(Path(path).name + ".tmp")


def _old_name(path: Path) -> Path:
    return Path(path).with_name(Path(path).name + ".old")


def replace_path(path: Path, tmp: Path) -> None:
    """Rename the complete `tmp` (file or directory) to `path`. One that is there is moved to `NAME.old` first and
    removed after: a kill in between leaves the old one whole, for `roll_forward` to put back."""
    path, tmp = Path(path), Path(tmp)
    fsync_tree(tmp)
    if path.exists():
        old = _old_name(path)
        remove(old)
        path.rename(old)
        tmp.rename(path)
        remove(old)
    else:
        tmp.rename(path)
    fsync_dir(path.parent)


def roll_forward(path: Path) -> None:
    """Clean up after a `replace_path` of `path` that a kill interrupted: an `.old` with nothing in its place goes
    back, every other leftover (a partial `.tmp`, an `.old` already replaced) is removed."""
    path = Path(path)
    old, tmp = _old_name(path), temporary_name(path)
    if old.exists() and not path.exists():
        old.rename(path)
    remove(old)
    remove(tmp)


# ------------------------------------------------------------------ symlinks
def point_symlink(link: Path, target: str) -> bool:
    """Make `link` a symlink to `target` with one rename (readers see the old or the new target); False when it
    already pointed there (nothing changed)."""
    link = Path(link)
    if link.is_symlink() and os.readlink(link) == target:
        return False
    tmp = link.with_name(f".{link.name}.link.tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)
    fsync_dir(link.parent)
    return True


# ------------------------------------------------------------------ output directories
def current_umask() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def make_shareable(directory: Path) -> None:
    """Give `directory` and everything in it the permissions the umask grants new files (and fsync the files).

    Some writers ignore the umask: mkdtemp makes the directory private and safetensors writes its files 0600,
    while a model directory is meant to be shared like any other output."""
    umask = current_umask()
    for path in [directory, *directory.rglob("*")]:
        if path.is_symlink():
            continue
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


# Temp dirs of atomic_output_dir, named after their owner: .NAME.tmp-HOST-PID-RANDOM while written, .NAME.new-...
# once complete (one rename commits the switch), .NAME.old-... holding the directory being replaced
_OWNED_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|new|old)-(?P<host>.+)-(?P<pid>\d+)-[a-z0-9_]+$")
_REPLACED = "replaced"  # inside an .old- temp dir: the directory being replaced


@contextmanager
def atomic_output_dir(out_dir: Path, overwrite: bool, flag: str = "--out_dir",
                      inputs: dict[str, Path | None] | None = None) -> Iterator[Path]:
    """Yield a fresh temp dir beside `out_dir`; it becomes `out_dir` only if the block finishes without error.

    `inputs` ({flag: path}) are what the block reads: replacing an `out_dir` that holds one of them (e.g. the run
    directory of the checkpoint being exported) would delete it, so that is refused, --overwrite or not.
    The temp dir's name records this host and process: those a killed run left beside `out_dir` are cleaned up here
    once their process is gone (see `remove_stale_temp_dirs`). A full disk is one CheckpointError; nothing is replaced.
    Killed at any moment, `out_dir` is the old directory or the new one (the next run finishes a switch whose new
    directory was complete), never absent.
    """
    out_dir = Path(out_dir)
    check_output_path(out_dir, flag)
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"{flag} {out_dir}: exists and is not a directory")
    for input_flag, path in (inputs or {}).items():
        if path is not None and out_dir.exists() and (
                Path(path).resolve() == out_dir.resolve() or out_dir.resolve() in Path(path).resolve().parents):
            raise CheckpointError(f"{flag} {out_dir}: holds the input {input_flag} {path}, which replacing it would "
                                  f"delete; choose another {flag}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_dirs(out_dir.parent)  # finishes or undoes the switch of a killed run
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise CheckpointError(f"{flag} {out_dir}: exists and is not empty (pass --overwrite to replace it)")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-{_owner()}", dir=out_dir.parent))
    complete = tmp.with_name(f".{out_dir.name}.new-{tmp.name.removeprefix(f'.{out_dir.name}.tmp-')}")
    try:
        yield tmp
        make_shareable(tmp)
        tmp.rename(complete)
        _switch(complete, out_dir)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CheckpointError(f"{flag} {out_dir}: no space left on device (writing {e.filename or tmp}); "
                                  f"nothing was replaced") from None
        raise
    finally:
        for leftover in (tmp, complete):
            if leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)


def _owner() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-"


def _switch(complete: Path, target: Path) -> None:
    """Rename the complete directory `complete` to `target`; one that is there goes into an `.old-` temp dir first
    and is deleted after."""
    if not target.exists():
        complete.rename(target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-{_owner()}", dir=target.parent))
    target.rename(old / _REPLACED)
    try:
        complete.rename(target)
    except OSError:
        (old / _REPLACED).rename(target)  # the old directory goes back where it was
        old.rmdir()
        raise
    shutil.rmtree(old)


def remove_stale_temp_dirs(parent: Path) -> None:
    """Clean up after the `atomic_output_dir`s in `parent` whose process is gone from this host (killed runs leave
    full-size copies behind). A complete new directory (`.new-`) is switched in, as its run would have done; a
    directory moved aside for replacing goes back if nothing took its place; partial ones are removed."""
    host = socket.gethostname()
    stale = []
    for entry in Path(parent).iterdir():
        match = _OWNED_TEMP.match(entry.name)
        if match and match["host"] == host and not _process_alive(int(match["pid"])) and entry.is_dir():
            stale.append((entry, match))
    for entry, match in sorted(stale, key=lambda item: item[1]["kind"] != "new"):  # switches first
        target, aside = entry.with_name(match["name"]), entry / _REPLACED
        try:
            if match["kind"] == "new":
                _switch(entry, target)
                print(f"note: finished switching {target} to the complete new directory a killed process "
                      f"({match['pid']}) had written", file=sys.stderr)
                continue
            if match["kind"] == "old" and aside.is_dir() and not target.exists():
                aside.rename(target)
                print(f"note: put back {target}, which a killed process ({match['pid']}) had moved aside",
                      file=sys.stderr)
            shutil.rmtree(entry)
            print(f"note: removed {entry}, left by a killed process ({match['pid']})", file=sys.stderr)
        except OSError as e:  # e.g. another user's: not ours to clean
            print(f"note: cannot clean up {entry}, left by a killed process ({e.strerror or e})", file=sys.stderr)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
