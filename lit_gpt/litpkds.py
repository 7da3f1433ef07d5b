"""The TinyLlama `LITPKDS` chunk format: a 24-byte header, then `chunk_size` tokens in C order.

Header: magic b"LITPKDS" (7 bytes), version <Q (= 1), dtype code <B, chunk_size <Q (tokens in the file).
Files are named `{prefix}_{counter:010d}.bin`. Files written here read in TinyLlama and the other way round.
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from lit_gpt.errors import InputError

MAGIC = b"LITPKDS"
VERSION = 1
HEADER_SIZE = 24
_HEADER = struct.Struct("<7sQBQ")
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float32, 7: np.float64, 8: np.uint16}
_INTEGER_CODES = {1, 2, 3, 4, 5, 8}
assert _HEADER.size == HEADER_SIZE


class ChunkFormatError(InputError, ValueError):
    """A chunk file that is not a valid LITPKDS file; the message names the file."""


def token_dtype(vocab_size: int) -> np.dtype:
    """TinyLlama's rule: uint16 while every id fits with room to spare, else int32."""
    return np.dtype(np.uint16 if vocab_size < 65500 else np.int32)


def dtype_code(dtype) -> int:
    dtype = np.dtype(dtype)
    for code, candidate in DTYPES.items():
        if np.dtype(candidate) == dtype:
            return code
    raise ValueError(f"dtype {dtype} has no LITPKDS code")


def chunk_name(prefix: str, counter: int) -> str:
    return f"{prefix}_{counter:010d}.bin"


def encode_header(dtype, chunk_size: int) -> bytes:
    return _HEADER.pack(MAGIC, VERSION, dtype_code(dtype), chunk_size)


def read_header(path: Path) -> tuple[np.dtype, int]:
    """(dtype, chunk_size) of a chunk file, after checking magic, version, dtype and the file size."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER_SIZE)
        size = path.stat().st_size
    except OSError as e:
        raise ChunkFormatError(f"{path}: cannot read chunk file ({e.strerror or e})") from None
    if len(raw) < HEADER_SIZE:
        raise ChunkFormatError(f"{path}: truncated LITPKDS header ({len(raw)} of {HEADER_SIZE} bytes)")
    magic, version, code, chunk_size = _HEADER.unpack(raw)
    if magic != MAGIC:
        raise ChunkFormatError(f"{path}: not a LITPKDS chunk (magic {magic!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise ChunkFormatError(f"{path}: unsupported LITPKDS version {version} (expected {VERSION})")
    if code not in DTYPES:
        raise ChunkFormatError(f"{path}: unknown dtype code {code} (known: {sorted(DTYPES)})")
    if code not in _INTEGER_CODES:
        raise ChunkFormatError(f"{path}: dtype {np.dtype(DTYPES[code])} cannot hold token ids")
    dtype = np.dtype(DTYPES[code])
    expected = HEADER_SIZE + chunk_size * dtype.itemsize
    if size != expected:
        raise ChunkFormatError(f"{path}: file has {size} bytes but its header promises {chunk_size} {dtype} tokens "
                               f"({expected} bytes); truncated or corrupt")
    return dtype, chunk_size
