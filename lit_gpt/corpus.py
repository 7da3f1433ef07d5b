"""Documents (id, text) from `.txt`, `.jsonl`, `.jsonl.zst` and `.parquet` files, cut into ordered work units.

The main process cuts the inputs into units (line-aligned byte blocks, whole `.txt` files, parquet row groups),
cheap work that keeps the order deterministic; `parse_unit` (run in worker processes) turns a unit into
documents. A document's id is the record's id field, else `name:line` (`name` = the file's path relative to the
common folder of all inputs, so ids survive moving the corpus). A `.txt` file is one document (id `name`), or one
document per non-empty line with `txt_docs_per_line`. Malformed records come back as messages naming file and line.
"""
from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

from lit_gpt import errors

FORMATS = ("jsonl.zst", "jsonl", "txt", "parquet")
UNIT_BYTES = 1 << 20


class InputError(errors.InputError, ValueError):
    """Bad input; the message names the file (and line) or the flag. Also a ValueError for the callers that
    catch those."""


def file_format(path: Path) -> str | None:
    name = path.name.lower()
    return next((f for f in FORMATS if name.endswith("." + f)), None)


def expand_inputs(paths: Sequence[str | Path], flag: str = "--input") -> list[Path]:
    """Files named on the command line; directories contribute their supported files, sorted."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and file_format(p))
            if not found:
                raise InputError(f"{flag} {path}: directory holds no {'/'.join('.' + f for f in FORMATS)} files")
            files.extend(found)
        elif path.is_file():
            if file_format(path) is None:
                raise InputError(f"{flag} {path}: unsupported file type (use {', '.join('.' + f for f in FORMATS)})")
            files.append(path)
        else:
            raise InputError(f"{flag} {path}: no such file or directory")
    if not files:
        raise InputError(f"{flag}: no input files given")
    seen: set[Path] = set()
    unique = []
    for path in files:  # the same file named twice is read once
        if path.resolve() not in seen:
            seen.add(path.resolve())
            unique.append(path)
    return unique


def document_names(files: Sequence[Path]) -> list[str]:
    """Stable per-file names for document ids: paths relative to the inputs' common folder."""
    resolved = [p.resolve() for p in files]
    if len(resolved) == 1:
        return [resolved[0].name]
    root = Path(os.path.commonpath([p.parent for p in resolved]))
    return [p.relative_to(root).as_posix() for p in resolved]


@dataclass(frozen=True)
class Unit:
    index: int  # position in the deterministic unit sequence (of a shard, or of all inputs for iter_units)
    file: int  # index into the input file list
    kind: str  # "lines" (jsonl or txt lines), "text" (whole .txt), "parquet" (row group), "error"
    first_line: int  # 1-based line/row number of the payload's first record
    payload: bytes | int | str  # line-aligned bytes, a row-group number, or an error message
    size: int  # input bytes this unit accounts for (progress)


@dataclass(frozen=True)
class Shard:
    """A contiguous piece of one input file; shards in index order are the corpus in order.

    kind "lines": the lines (records) that start in bytes [start, end) of a .jsonl/.txt file, or of the
    decompressed stream of a .jsonl.zst file (end -1: to the end); "parquet": row groups [start, end); "text": a
    whole .txt document. A shard is read in constant memory: a task seeks past the bytes before it (counting their
    lines, so that `file:line` ids and error messages stay exact), then streams its own."""
    index: int
    file: int
    kind: str
    start: int
    end: int
    size: int  # approximate input bytes on disk (for progress and balancing)


def plan_shards(files: Sequence[Path], shard_bytes: int, txt_docs_per_line: bool = False) -> list[Shard]:
    """Cut the inputs into shards of about `shard_bytes` from file sizes and parquet footers alone (no reading)."""
    shards: list[Shard] = []

    def add(file_index: int, kind: str, start: int, end: int, size: int) -> None:
        shards.append(Shard(len(shards), file_index, kind, start, end, size))

    for file_index, path in enumerate(files):
        fmt, size = file_format(path), path.stat().st_size
        if fmt == "txt" and not txt_docs_per_line:
            add(file_index, "text", 0, -1, size)
        elif fmt == "parquet":
            groups = _parquet_group_sizes(path)
            if groups is None:  # unreadable: one shard that reports it
                add(file_index, "parquet", 0, -1, size)
                continue
            first = 0
            for g in range(len(groups)):
                if sum(groups[first:g + 1]) >= shard_bytes or g == len(groups) - 1:
                    add(file_index, "parquet", first, g + 1, sum(groups[first:g + 1]))
                    first = g + 1
            if not groups:
                add(file_index, "parquet", 0, 0, size)
        else:
            # .jsonl.zst: ranges of the decompressed stream, sized from the frame header (else ~4x compressed);
            # the last shard is open-ended, so a wrong estimate only changes the balance, never the data.
            stream = _zstd_content_size(path) if fmt == "jsonl.zst" else size
            n = max(1, -(-stream // shard_bytes))
            for k in range(n):
                add(file_index, "lines", k * shard_bytes, (k + 1) * shard_bytes if k < n - 1 else -1, -(-size // n))
    return shards


def _parquet_group_sizes(path: Path) -> list[int] | None:
    try:
        import pyarrow.parquet as pq

        metadata = pq.ParquetFile(path).metadata
        return [metadata.row_group(g).total_byte_size for g in range(metadata.num_row_groups)]
    except Exception:  # pyarrow raises several types for unreadable files
        return None


def _zstd_content_size(path: Path) -> int:
    import zstandard

    with open(path, "rb") as f:
        header = f.read(18)
    try:
        size = zstandard.frame_content_size(header)
    except zstandard.ZstdError:
        size = -1
    return size if size >= 0 else 4 * path.stat().st_size


def iter_units(files: Sequence[Path], txt_docs_per_line: bool = False,
               unit_bytes: int | None = None) -> Iterator[Unit]:
    """All units of all inputs in order (one shard per file), numbered consecutively."""
    index = 0
    for shard in plan_shards(files, 1 << 62, txt_docs_per_line):
        for unit in shard_units(shard, files, unit_bytes):
            yield Unit(index, unit.file, unit.kind, unit.first_line, unit.payload, unit.size)
            index += 1


def shard_units(shard: Shard, files: Sequence[Path], unit_bytes: int | None = None) -> Iterator[Unit]:
    """The units of one shard in order, numbered from 0; about `unit_bytes` each, read in constant memory."""
    unit_bytes = unit_bytes or UNIT_BYTES
    path = files[shard.file]
    pieces = _shard_pieces(path, shard, unit_bytes)
    for index, (kind, first_line, payload, size) in enumerate(pieces):
        yield Unit(index, shard.file, kind, first_line, payload, size)


def _shard_pieces(path: Path, shard: Shard, unit_bytes: int):
    if shard.kind == "text":
        yield "text", 1, path.read_bytes(), shard.size
        return
    if shard.kind == "parquet":
        try:
            import pyarrow.parquet as pq

            metadata = pq.ParquetFile(path).metadata
            rows = [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]
        except Exception as e:  # pyarrow raises several types for unreadable files
            yield "error", 0, f"{path}: unreadable parquet file ({e})", shard.size
            return
        first = 1 + sum(rows[:shard.start])
        for group in range(shard.start, shard.end if shard.end >= 0 else len(rows)):
            yield "parquet", first, group, shard.size // max(1, shard.end - shard.start)
            first += rows[group]
        return
    end = None if shard.end < 0 else shard.end
    line = 1
    with open(path, "rb") as raw:
        blocks = _zstd_blocks(raw, unit_bytes) if file_format(path) == "jsonl.zst" else \
            iter(lambda: raw.read(unit_bytes), b"")
        try:
            own, line = _lines_from(blocks, shard.start, end)
            for payload in _line_aligned(own):
                yield "lines", line, payload, len(payload)
                line += payload.count(b"\n")
        except _ZstdFailure as e:
            yield "error", line, f"{path}: corrupt zstd stream after line {line - 1} ({e})", 0


def _lines_from(blocks: Iterator[bytes], start: int, end: int | None) -> tuple[Iterator[bytes], int]:
    """(the bytes of the lines that start in [start, end) of the stream, the number of their first line).

    The bytes before `start` are read and their lines counted; the line that crosses `start` belongs to the shard
    before, the line that crosses `end` to this one."""
    pos, line, rest = 0, 1, b""
    if start > 0:
        target = start - 1  # the first newline at or after here ends the last line of the shard before
        for block in blocks:
            if pos + len(block) <= target:
                line += block.count(b"\n")
                pos += len(block)
                continue
            newline = block.find(b"\n", max(0, target - pos))
            if newline < 0:
                line += block.count(b"\n")
                pos += len(block)
                continue
            line += block.count(b"\n", 0, newline + 1)
            rest, pos = block[newline + 1:], pos + newline + 1
            break
        else:
            return iter(()), line
    if end is not None and pos >= end:
        return iter(()), line

    def own() -> Iterator[bytes]:
        at = pos
        for block in chain([rest], blocks):
            if end is not None and at + len(block) >= end:
                newline = block.find(b"\n", max(0, end - 1 - at))
                if newline >= 0:
                    yield block[:newline + 1]
                    return
            yield block
            at += len(block)

    return own(), line


class _ZstdFailure(Exception):
    pass


def _zstd_blocks(raw, read_size: int) -> Iterator[bytes]:
    """Decompressed data of all frames; a truncated last frame is an error (zstandard's readers ignore it)."""
    import zstandard

    dctx = zstandard.ZstdDecompressor()
    obj, in_frame = dctx.decompressobj(), False
    try:
        while True:
            data = raw.read(read_size)
            if not data:
                break
            while data:
                out = obj.decompress(data)
                in_frame = True
                if out:
                    yield out
                if obj.eof:
                    data, obj, in_frame = obj.unused_data, dctx.decompressobj(), False
                else:
                    data = b""
    except zstandard.ZstdError as e:
        raise _ZstdFailure(str(e)) from None
    if in_frame:
        raise _ZstdFailure("truncated: the last frame is incomplete")


def _line_aligned(blocks: Iterator[bytes]) -> Iterator[bytes]:
    rest = b""
    for block in blocks:
        block = rest + block if rest else block
        cut = block.rfind(b"\n") + 1
        if cut:
            yield block[:cut]
        rest = block[cut:]
    if rest:
        yield rest


def parse_unit(unit: Unit, files: Sequence[Path], names: Sequence[str], text_field: str = "text",
               id_field: str = "id") -> tuple[list[str], list[str], list[str]]:
    """(ids, texts, error messages) of one unit."""
    path, name = files[unit.file], names[unit.file]
    if unit.kind == "error":
        return [], [], [unit.payload]
    if unit.kind == "text":
        try:
            text = unit.payload.decode("utf-8")
        except UnicodeDecodeError as e:
            return [], [], [f"{path}: invalid UTF-8 at byte {e.start}"]
        return [name], [text.removeprefix("\ufeff")], []
    if unit.kind == "parquet":
        return _parse_parquet(unit, path, name, text_field, id_field)
    is_json = file_format(path) != "txt"
    fast = _parse_json_lines_fast(unit, name, text_field, id_field) if is_json else None
    if fast is not None:
        return fast[0], fast[1], []
    return _parse_lines(unit, path, name, is_json, text_field, id_field)


def _parse_lines(unit: Unit, path: Path, name: str, is_json: bool, text_field: str, id_field: str):
    """Line by line: every record checked, every problem named with file and line."""
    ids, texts, errors = [], [], []
    lines = _split_lines(unit.payload, unit.first_line, path, errors)
    if unit.first_line == 1 and lines[0]:
        lines[0] = lines[0].removeprefix("\ufeff")
    decode = _JSON_DECODER.decode
    for number, line in enumerate(lines, unit.first_line):
        if not line or line.isspace():
            continue
        if not is_json:
            ids.append(f"{name}:{number}")
            texts.append(line.rstrip("\r"))
            continue
        try:
            record = decode(line)
        except ValueError as e:
            errors.append(f"{path}:{number}: invalid JSON ({getattr(e, 'msg', e)})")
            continue
        text, error = _record_text(record, text_field)
        if error:
            errors.append(f"{path}:{number}: {error}")
            continue
        doc_id = record.get(id_field)
        doc_id = f"{name}:{number}" if doc_id is None else str(doc_id)
        # JSON may escape a lone UTF-16 surrogate ("\ud800"): not Unicode text, the tokenizer and the UTF-8 id hash
        # would crash on it. (pyarrow's reader rejects such units, so only this path sees them.)
        bad = next((f for f, value in ((f"text field '{text_field}'", text), (f"id field '{id_field}'", doc_id))
                    if _SURROGATE.search(value)), None)
        if bad:
            errors.append(f"{path}:{number}: {bad} holds a lone UTF-16 surrogate escape (not valid Unicode)")
            continue
        ids.append(doc_id)
        texts.append(text)
    return ids, texts, errors


_JSON_DECODER = json.JSONDecoder()
_SURROGATE = re.compile("[\ud800-\udfff]")


def _parse_json_lines_fast(unit: Unit, name: str, text_field: str, id_field: str):
    """(ids, texts) through pyarrow's JSON reader (about twice as fast as the json module), or None whenever the
    unit is anything but clean (blank lines, bad records, unusual types): the line-by-line path then decides and
    names every problem, so both paths give the same documents."""
    import pyarrow as pa
    import pyarrow.json as pa_json

    payload = unit.payload
    lines = payload.count(b"\n") + (not payload.endswith(b"\n"))
    if not payload.strip() or b"\n\n" in payload or payload[:1].isspace() or payload.startswith(b"\xef\xbb\xbf"):
        return None
    try:
        table = pa_json.read_json(pa.BufferReader(payload),
                                  read_options=pa_json.ReadOptions(use_threads=False, block_size=len(payload) + 1))
    except (pa.ArrowException, ValueError):
        return None
    columns = table.schema.names
    if table.num_rows != lines or text_field not in columns:
        return None
    text = table.column(text_field)
    if not pa.types.is_string(text.type) or text.null_count:
        return None
    id_column = table.column(id_field) if id_field in columns else None
    if id_column is not None and not any(
            check(id_column.type) for check in (pa.types.is_string, pa.types.is_integer, pa.types.is_null)):
        return None
    try:  # pyarrow keeps invalid UTF-8 inside JSON strings and fails only when it converts them
        texts = text.to_pylist()
        raw_ids = id_column.to_pylist() if id_column is not None else [None] * lines
    except UnicodeDecodeError:
        return None
    ids = [f"{name}:{n}" if i is None else str(i) for n, i in enumerate(raw_ids, unit.first_line)]
    return ids, texts


def _split_lines(payload: bytes, first_line: int, path: Path, errors: list[str]) -> list[str | None]:
    """Decoded lines (None for a line that is not UTF-8, reported in `errors`)."""
    try:
        return payload.decode("utf-8").split("\n")
    except UnicodeDecodeError:
        pass
    lines: list[str | None] = []
    for number, raw in enumerate(payload.split(b"\n"), first_line):
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            errors.append(f"{path}:{number}: invalid UTF-8 at byte {e.start} of the line")
            lines.append(None)
    return lines


def _record_text(record, text_field: str) -> tuple[str | None, str | None]:
    if type(record) is dict and type(record.get(text_field)) is str:  # the common case, fast
        return record[text_field], None
    if not isinstance(record, dict):
        return None, f"record is a JSON {type(record).__name__}, not an object"
    if text_field not in record:
        return None, f"missing text field '{text_field}'"
    text = record[text_field]
    if not isinstance(text, str):
        return None, f"text field '{text_field}' holds {type(text).__name__}, not a string"
    return text, None


def _parse_parquet(unit: Unit, path: Path, name: str, text_field: str, id_field: str):
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        columns = [c for c in (text_field, id_field) if c in parquet.schema_arrow.names]
        if text_field not in columns:
            return [], [], [f"{path}: no column '{text_field}' (columns: {', '.join(parquet.schema_arrow.names)})"]
        table = parquet.read_row_group(unit.payload, columns=columns)
    except Exception as e:  # pyarrow raises several types for unreadable files
        return [], [], [f"{path}: unreadable parquet row group {unit.payload} ({e})"]
    texts_raw = table.column(text_field).to_pylist()
    ids_raw = table.column(id_field).to_pylist() if id_field in columns else [None] * len(texts_raw)
    ids, texts, errors = [], [], []
    for number, (doc_id, text) in enumerate(zip(ids_raw, texts_raw), unit.first_line):
        if not isinstance(text, str):
            errors.append(f"{path}:row {number}: text field '{text_field}' holds {type(text).__name__}, not a string")
            continue
        ids.append(f"{name}:{number}" if doc_id is None else str(doc_id))
        texts.append(text)
    return ids, texts, errors


class ErrorPolicy:
    """`--on_error stop` raises the first message; `skip` counts them and prints the first few."""

    SHOWN = 10

    def __init__(self, on_error: str) -> None:
        if on_error not in ("skip", "stop"):
            raise InputError(f"--on_error {on_error}: use 'skip' or 'stop'")
        self.on_error = on_error
        self.count = 0

    def report(self, errors: Sequence[str]) -> None:
        if not errors:
            return
        if self.on_error == "stop":
            raise InputError(f"{errors[0]} (use --on_error skip to skip malformed records)")
        for message in errors:
            self.count += 1
            if self.count <= self.SHOWN:
                print(f"warning: skipped: {message}", file=sys.stderr)
        if self.count > self.SHOWN and self.count - len(errors) <= self.SHOWN:
            print("warning: further skipped records are only counted", file=sys.stderr)


def iter_documents(files: Sequence[Path], policy: ErrorPolicy, text_field: str = "text", id_field: str = "id",
                   txt_docs_per_line: bool = False) -> Iterator[tuple[str, str]]:
    """All (id, text) pairs in order, in this process."""
    names = document_names(files)
    for unit in iter_units(files, txt_docs_per_line):
        ids, texts, errors = parse_unit(unit, files, names, text_field, id_field)
        policy.report(errors)
        yield from zip(ids, texts)
