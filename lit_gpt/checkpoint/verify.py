"""Integrity checks of what training reads back: checkpoints and data chunks.

Damage that leaves a file readable is otherwise silent: torch.load does not check the CRC-32s of a checkpoint's zip
records (16 flipped bytes in an optimizer tensor loaded as 1.5e29 and training went on), and flipped token bytes in a
chunk train on whatever ids they make.

- A full checkpoint is one `torch.save` zip archive, and torch writes a CRC-32 for every record: `verify_checkpoint`
  recomputes them and checks that every record the pickle refers to is in the archive (a renamed record keeps its
  CRC). Nothing extra is written, so the check is atomic with the file by construction and also covers full
  checkpoints written before this module existed.
- A sharded checkpoint directory holds `checksums.sha256` (sha256sum's format: `cd DIR && sha256sum -c
  checksums.sha256` checks it by hand), written into the directory before the directory is renamed into place.
- A data chunk has the sha256 that `scripts/prepare_data.py` records for it in `manifest.json`.

`check_checkpoint` checks here, in this process; `lit_gpt.checkpoint.find.verify_checkpoint` is the collective form
the trainer uses (rank 0 checks, every rank gets the verdict). Nothing here imports torch: `sha256_file` is the one
sha256 helper of the project (tokenizer provenance, data chunks, checkpoints).

Files are read through memory maps, in several threads (zlib and hashlib release the GIL on large buffers).
"""
from __future__ import annotations

import hashlib
import io
import mmap
import os
import pickle
import struct
import threading
import zipfile
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from lit_gpt.checkpoint.layout import CHECKSUM_FILE, DamagedError

THREADS = max(1, min(8, os.cpu_count() or 1))
_BLOCK = 64 << 20
# A zip local file header (APPNOTE 4.3.7) is 30 bytes: the signature, 22 bytes we skip, then the lengths of the name
# and of the extra field that sit between the header and the record's data.
_LOCAL_HEADER = struct.Struct("<4s22xHH")
_LOCAL_SIGNATURE = b"PK\x03\x04"
_verified: dict[tuple, bool] = {}
_verified_lock = threading.Lock()


# ------------------------------------------------------------------ reading and hashing
def _scan(path: Path, update: Callable[[memoryview], Any], start: int = 0, length: int | None = None) -> None:
    """Feed bytes [start, start + length) of a file to `update`, block by block, through a memory map."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        length = size - start if length is None else length
        if start + length > size:
            raise DamagedError(f"{path}: truncated ({size} bytes, the data runs to byte {start + length})")
        if length == 0:
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            for begin in range(start, start + length, _BLOCK):
                end = min(begin + _BLOCK, start + length)
                with memoryview(mapped)[begin:end] as block:
                    update(block)
                if hasattr(mapped, "madvise"):  # done with these pages: keep the resident size at one block
                    page_start = begin // mmap.PAGESIZE * mmap.PAGESIZE
                    mapped.madvise(mmap.MADV_DONTNEED, page_start, end - page_start)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    _scan(path, digest.update)
    return digest.hexdigest()


def copy_with_sha256(source: Path, target: Path) -> str:
    """Copy `source` to `target`; returns the sha256 of the bytes copied (one read for both)."""
    digest = hashlib.sha256()
    with open(target, "wb") as out:
        def update(block: memoryview) -> None:
            digest.update(block)
            out.write(block)

        _scan(source, update)
    return digest.hexdigest()


def sha256_mismatch(path: Path, listing: str) -> str:
    return f"{path}: damaged (its sha256 differs from the one in {listing})"


def in_threads(fn: Callable, items: Iterable) -> list:
    items = list(items)
    if len(items) <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(min(THREADS, len(items))) as pool:
        return list(pool.map(fn, items))


def write_checksums(directory: Path, digests: dict[str, str]) -> None:
    """`checksums.sha256` in `directory`: one `<sha256>  <name>` line per file."""
    with open(Path(directory) / CHECKSUM_FILE, "w") as f:
        f.writelines(f"{digest}  {name}\n" for name, digest in sorted(digests.items()))
        f.flush()
        os.fsync(f.fileno())


# ------------------------------------------------------------------ checkpoints
def check_checkpoint(path: Path) -> bool:
    """Check a full checkpoint file or a sharded checkpoint directory against what was written.

    True: verified. False: there is nothing to check against (a sharded directory without checksums.sha256, or an
    archive written without CRCs). Raises DamagedError naming the damaged file. A verified checkpoint is remembered
    by the sizes and modification times of its files, so verifying it again in this process costs nothing.
    """
    path = Path(path)
    if not path.exists():
        raise DamagedError(f"{path}: no such checkpoint")
    key = _signature(path)
    with _verified_lock:
        if key in _verified:
            return _verified[key]
    verified = _verify_archive(path) if path.is_file() else _verify_directory(path)
    with _verified_lock:
        _verified[key] = verified
    return verified


def mark_verified(path: Path) -> None:
    """Record as verified a checkpoint whose checksums were just computed from its files on disk."""
    with _verified_lock:
        _verified[_signature(Path(path))] = True


def _signature(path: Path) -> tuple:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return (str(path.resolve()),) + tuple((str(f), *_size_and_mtime(f)) for f in files)


def _size_and_mtime(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def _verify_archive(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise DamagedError(f"{path}: not a readable checkpoint archive ({e})") from None
    if not any(r.CRC for r in records if r.file_size):
        return False  # torch.save with CRCs switched off: all zero
    problems = [p for p in in_threads(lambda r: _check_record(path, r),
                                      sorted(records, key=lambda r: -r.compress_size)) if p]
    if not problems:  # each record's bytes are intact; now whether every record the pickle refers to is there
        problems = _missing_records(path, records)
    if problems:
        more = f" (and {len(problems) - 1} more damaged records)" if len(problems) > 1 else ""
        raise DamagedError(f"{path}: damaged: {problems[0]}{more}")
    return True


def _check_record(path: Path, record: zipfile.ZipInfo) -> str | None:
    """None when the record's bytes have the CRC-32 its archive lists, else what is wrong."""
    if record.compress_type != zipfile.ZIP_STORED:  # torch stores records uncompressed; others go through zipfile
        try:
            with zipfile.ZipFile(path) as archive, archive.open(record) as f:
                while f.read(_BLOCK):
                    pass
            return None
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
            return f"record {record.filename}: {e}"
    with open(path, "rb") as f:
        f.seek(record.header_offset)
        header = f.read(_LOCAL_HEADER.size)
    if len(header) < _LOCAL_HEADER.size or header[:4] != _LOCAL_SIGNATURE:
        return f"record {record.filename}: its zip header at byte {record.header_offset} is damaged"
    _, name_length, extra_length = _LOCAL_HEADER.unpack(header)
    start = record.header_offset + _LOCAL_HEADER.size + name_length + extra_length
    crc = 0

    def update(block: memoryview) -> None:
        nonlocal crc
        crc = zlib.crc32(block, crc)

    try:
        _scan(path, update, start, record.compress_size)
    except DamagedError:
        return f"record {record.filename}: truncated"
    if crc != record.CRC:
        return (f"record {record.filename} (bytes {start}-{start + record.compress_size - 1}) does not match the "
                f"CRC-32 written with it")
    return None


class _Inert:
    """Whatever a torch.save pickle builds (tensors, OrderedDicts, ...), built as nothing: reading the pickle's
    structure runs no code of its own."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __setstate__(self, state) -> None:
        pass

    def __setitem__(self, key, value) -> None:
        pass

    def append(self, value) -> None:
        pass

    def extend(self, values) -> None:
        pass


class _StorageKeys(pickle.Unpickler):
    """Collects the keys of the tensor storages a torch.save pickle refers to (its persistent ids
    `('storage', type, key, location, numel)`, each stored as the record `<prefix>/data/<key>`)."""

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self.keys: set[str] = set()

    def find_class(self, module: str, name: str) -> type:
        return _Inert

    def persistent_load(self, pid) -> _Inert:
        if isinstance(pid, tuple) and len(pid) > 2 and pid[0] == "storage":
            self.keys.add(str(pid[2]))
        return _Inert()


def _missing_records(path: Path, records: list[zipfile.ZipInfo]) -> list[str]:
    """What torch.load would fail to find: the pickle, or a storage record the pickle refers to. A renamed record
    keeps its CRC-32, so the byte checks alone pass such an archive."""
    names = {r.filename for r in records}
    pickles = [name for name in names if name.endswith("/data.pkl") and name.count("/") == 1]
    if len(pickles) != 1:
        return ["no record <name>/data.pkl (the pickle of the saved object)" if not pickles else
                f"several pickle records ({', '.join(sorted(pickles))})"]
    prefix = pickles[0].removesuffix("data.pkl")
    with zipfile.ZipFile(path) as archive:
        reader = _StorageKeys(archive.read(pickles[0]))
    try:
        reader.load()
    except Exception as e:  # any damage of the pickle's own structure; its bytes matched their CRC-32
        return [f"record {pickles[0]} is not a readable pickle ({type(e).__name__}: {e})"]
    return [f"record {prefix}data/{key} is missing (the pickle refers to it)"
            for key in sorted(reader.keys, key=lambda k: (len(k), k)) if f"{prefix}data/{key}" not in names]


def _verify_directory(path: Path) -> bool:
    listing = path / CHECKSUM_FILE
    if not listing.is_file():
        return False
    try:
        expected = dict(_parse_checksum_line(line) for line in listing.read_text().splitlines() if line.strip())
    except (OSError, ValueError) as e:
        raise DamagedError(f"{listing}: unreadable ({e})") from None

    def check(name: str) -> str | None:
        file = path / name
        if not file.is_file():
            return f"{file}: missing"
        if sha256_file(file) != expected[name]:
            return sha256_mismatch(file, CHECKSUM_FILE)
        return None

    problems = [p for p in in_threads(check, sorted(expected, key=lambda n: -_size_or_zero(path / n))) if p]
    if problems:
        more = f" (and {len(problems) - 1} more damaged files)" if len(problems) > 1 else ""
        raise DamagedError(f"{problems[0]}{more}")
    return True


def _parse_checksum_line(line: str) -> tuple[str, str]:
    digest, name = line[:64], line[66:]
    if len(digest) != 64 or line[64:66] not in ("  ", " *") or not name or Path(name).is_absolute() \
            or ".." in Path(name).parts:
        raise ValueError(f"malformed line {line!r}")
    int(digest, 16)
    return name, digest


def _size_or_zero(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
