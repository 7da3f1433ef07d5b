"""Node-local copies of chunk files (e.g. in /dev/shm or $TMPDIR), filled ahead of use by a background thread.

`prefetch(paths)` queues chunks the loader will need next; the thread copies each one under a temporary name,
verifies it (size and LITPKDS header equal to the source, and the sha256 its manifest records, given to `expect`)
and renames it into place, evicting the oldest copies first when the cache would exceed `max_bytes`. A chunk whose
bytes do not hash to its manifest's sha256 is damaged at the source: the next `prefetch` or `path` call raises
ChunkFormatError naming it. `path(source)` returns the cached copy when it has the source's size
and modification time (a copy carries the mtime of the version it copied), else the source itself: a full,
missing, broken, unwritable or stale cache only costs speed. Several ranks of a node may share one cache directory
(copies are atomic renames; eviction is by copy time, the copies' ctime).
"""
from __future__ import annotations

import errno
import hashlib
import os
import queue
import shutil
import sys
import threading
from collections.abc import Iterable
from pathlib import Path

from lit_gpt.checkpoint.verify import copy_with_sha256, sha256_mismatch
from lit_gpt.litpkds import HEADER_SIZE, ChunkFormatError, read_header


class NodeCache:
    def __init__(self, cache_dir, max_bytes: int | None = None) -> None:
        self.root = Path(cache_dir)
        self.broken = False
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self.max_bytes = int(max_bytes) if max_bytes else shutil.disk_usage(self.root).free // 2
        except OSError as e:
            self._give_up(f"cannot use {self.root} ({e})")
            self.max_bytes = 0
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._queued: set[Path] = set()
        self._sha256: dict[Path, str] = {}  # what the sources' manifests record
        self._damaged: dict[Path, str] = {}  # sources whose copy did not match it, and the error

    def expect(self, source: Path, sha256: str) -> None:
        """Copies of `source` must hash to `sha256` (its manifest's)."""
        self._sha256[Path(source)] = sha256

    # ------------------------------------------------------------------ reading
    def path(self, source: Path) -> Path:
        """The verified cached copy of `source` when there is one, else `source`."""
        self._raise_if_damaged(source)
        if self.broken:
            return source
        cached = self.cached_name(source)
        try:
            # Size and mtime, not size alone: the chunks of a re-prepared dataset have the sizes of the old ones, and
            # a cache in /dev/shm outlives jobs; a copy of the old version must not be read.
            copy, original = cached.stat(), source.stat()
            if (copy.st_size, copy.st_mtime_ns) == (original.st_size, original.st_mtime_ns):
                return cached
        except OSError:
            pass
        return source

    def cached_name(self, source: Path) -> Path:
        # Chunk names repeat across datasets (train_0000000000.bin): one sub-folder per source folder.
        folder = hashlib.sha1(str(Path(source).resolve().parent).encode()).hexdigest()[:16]
        return self.root / folder / Path(source).name

    # ------------------------------------------------------------------ filling
    def prefetch(self, sources: Iterable[Path]) -> None:
        """Queue chunks for copying, in the order they will be needed."""
        self._raise_if_damaged()
        if self.broken:
            return
        if self._thread is None:
            self._queue = queue.Queue()
            self._thread = threading.Thread(target=self._run, name="node-cache", daemon=True)
            self._thread.start()
        for source in sources:
            source = Path(source)
            if source not in self._queued:
                self._queued.add(source)
                self._queue.put(source)

    def wait(self) -> None:
        """Block until everything queued so far has been handled (tests, benchmarks)."""
        if self._queue is not None:
            self._queue.join()

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while True:
            source = self._queue.get()
            try:
                if source is None:
                    return
                if not self.broken:
                    self.copy(source)
            finally:
                self._queue.task_done()

    def copy(self, source: Path) -> bool:
        """Copy and verify one chunk now; False when it was not cached (too big, full, unreadable or broken)."""
        target = self.cached_name(source)
        try:
            stat = source.stat()
            size = stat.st_size
            if self.path(source) == target:
                return True
            if size > self.max_bytes or not self._make_room(size):
                return False
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            try:
                digest = copy_with_sha256(source, tmp)
                if source in self._sha256 and digest != self._sha256[source]:
                    self._damaged[source] = sha256_mismatch(source, "manifest.json")
                    return False
                read_header(tmp)  # a valid LITPKDS file whose size matches its header ...
                if tmp.stat().st_size != size or _header(tmp) != _header(source):  # ... and equals the source's
                    return False
                os.utime(tmp, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the version copied (see `path`)
                os.replace(tmp, target)
            except ChunkFormatError:
                return False
            finally:
                tmp.unlink(missing_ok=True)
            return True
        except FileNotFoundError:
            return False  # the source vanished or a concurrent eviction removed the copy: read the source
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):  # full: this chunk stays on the source
                return False
            self._give_up(f"cannot write to {self.root} ({e})")
            return False

    def _raise_if_damaged(self, source: Path | None = None) -> None:
        message = self._damaged.get(Path(source)) if source is not None else next(iter(self._damaged.values()), None)
        if message:
            raise ChunkFormatError(message)

    def _make_room(self, size: int) -> bool:
        """Evict the oldest cached files (by ctime: their mtime is the source's) until `size` more bytes fit."""
        files = []
        for folder in self.root.iterdir():
            if folder.is_dir():
                for entry in os.scandir(folder):
                    if entry.is_file() and not entry.name.startswith("."):
                        stat = entry.stat()
                        files.append((stat.st_ctime_ns, stat.st_size, Path(entry.path)))
        used = sum(f[1] for f in files)
        for _, file_size, path in sorted(files):
            if used + size <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            used -= file_size
        return used + size <= self.max_bytes

    def _give_up(self, reason: str) -> None:
        if not self.broken:
            print(f"warning: node cache disabled, reading from the source: {reason}", file=sys.stderr)
        self.broken = True

    def __getstate__(self) -> dict:
        # Data-loader workers get a reader-only copy; the filling thread stays in the main process.
        state = self.__dict__.copy()
        state.update(_queue=None, _thread=None, _queued=set())
        return state


def _header(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(HEADER_SIZE)
