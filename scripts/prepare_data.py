"""Tokenize a corpus into packed LITPKDS chunks with document indexes, split into train and validation.

    python scripts/prepare_data.py --input corpus/ --output_dir data --tokenizer tokenizer --workers 16

Inputs: .txt (one document per file; one per non-empty line with --txt_docs_per_line), .jsonl, .jsonl.zst and
.parquet (records with a text field and an optional id field; without one the id is `file:line`). Each document
becomes [BOS] tokens EOS (BOS optional with --no-bos), and documents are concatenated into chunks of --chunk_size
tokens. A document goes to validation when the hash of (seed, id) falls below --val_fraction, so the split is a
function of the id alone and no document lands in both.

Output, per split (DIR/train, DIR/val):
  {split}_{counter:010d}.bin   TinyLlama LITPKDS chunks (readable by TinyLlama's PackedDataset and by ours)
  index/{split}_{counter:010d}.json   the chunk's real token count, document starts and document ids
  manifest.json                files, token counts, sha256 hashes, tokenizer and settings; written last
The last chunk keeps the full size of its header (TinyLlama readers index it like any other); only its first
`tokens` entries (see its index file and the manifest) are data, the rest is the pad id (the tokenizer's pad,
else <unk>), never BOS/EOS separators. Our reader stops at the real tokens.

Files appear under their final names only when complete (temporary name + rename), and a run builds both splits
in DIR/.staging, moving them into place only at the end: data already in DIR stays whole and usable until then
(--overwrite replaces it only with a complete new dataset). Progress is saved every 30 s; an interrupted run
continues from there when re-run with the same inputs and settings, and a finished one is skipped. Malformed records are reported with file and line; --on_error skip counts and skips them.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import multiprocessing
import os
import shutil
import sys
import time
import zlib
from collections import deque
from itertools import chain
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lit_gpt.atomic_write import write_atomically  # noqa: E402
from lit_gpt.corpus import (  # noqa: E402
    ErrorPolicy, InputError, Unit, document_names, expand_inputs, iter_units, parse_unit)
from lit_gpt.litpkds import chunk_name, encode_header, token_dtype  # noqa: E402
from lit_gpt.sample_order import splitmix64  # noqa: E402
from lit_gpt.tokenizer import Tokenizer  # noqa: E402

SPLITS = ("train", "val")
STATE_FILE = ".prepare_state.npz"
# A run writes here and moves its splits into place only when both are complete: until then the dataset that was
# in --output_dir (if any) stays there, whole and usable.
STAGING = ".staging"
STATE_INTERVAL_S = 30.0
FORMAT_VERSION = 1


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="files or folders (.txt/.jsonl/.jsonl.zst/.parquet)")
    p.add_argument("--output_dir", type=Path, required=True)
    p.add_argument("--tokenizer", type=Path, required=True, help="tokenizer dir, .model or tokenizer.json")
    p.add_argument("--text_field", default="text")
    p.add_argument("--id_field", default="id")
    p.add_argument("--chunk_size", type=int, default=2049 * 1024, help="tokens per chunk file (TinyLlama's default)")
    p.add_argument("--val_fraction", type=float, default=0.001)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--on_error", default="stop", choices=["skip", "stop"], help="on malformed records")
    p.add_argument("--seed", type=int, default=42, help="salt of the train/val hash")
    p.add_argument("--txt_docs_per_line", action="store_true", help="each non-empty line of a .txt is a document")
    p.add_argument("--bos", action=argparse.BooleanOptionalAction, default=True, help="BOS at document start")
    p.add_argument("--overwrite", action="store_true", help="replace data prepared with other inputs or settings")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------- chunk writing
class ChunkWriter:
    """Appends documents to numbered chunk files; each chunk is written complete or not at all."""

    def __init__(self, directory: Path, prefix: str, chunk_size: int, dtype: np.dtype, pad_id: int) -> None:
        self.directory, self.prefix, self.chunk_size = directory, prefix, chunk_size
        self.dtype, self.pad_id = dtype, pad_id
        self.buffer = np.full(chunk_size, pad_id, dtype=dtype)
        self.fill = 0  # tokens in the open chunk
        self.counter = 0  # number of the open chunk
        self.docs_before = 0  # documents that started in finished chunks
        self.starts: list[np.ndarray] = []  # document starts in the open chunk, in pieces
        self.ids: list[str] = []
        self.files: list[dict] = []

    def add(self, tokens: np.ndarray, lengths: np.ndarray, ids: list[str]) -> None:
        """Append documents given as concatenated tokens, their lengths and ids."""
        doc_offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lengths) else np.zeros(0, np.int64)
        doc = 0
        pos = 0
        while pos < len(tokens):
            take = min(self.chunk_size - self.fill, len(tokens) - pos)
            end = doc + int(np.searchsorted(doc_offsets[doc:], pos + take, side="left"))
            self.starts.append(doc_offsets[doc:end] - pos + self.fill)
            self.ids.extend(ids[doc:end])
            doc = end
            self.buffer[self.fill:self.fill + take] = tokens[pos:pos + take]
            self.fill += take
            pos += take
            if self.fill == self.chunk_size:
                self._write_chunk()

    def finish(self) -> None:
        """Write the last, partial chunk: full size on disk, pad id after the real tokens (see the module doc)."""
        if self.fill:
            self.buffer[self.fill:] = self.pad_id
            self._write_chunk()

    def _write_chunk(self) -> None:
        name = chunk_name(self.prefix, self.counter)
        starts = np.concatenate(self.starts).tolist() if self.starts else []
        index = {"file": name, "chunk_size": self.chunk_size, "tokens": self.fill, "pad_id": self.pad_id,
                 "first_doc": self.docs_before, "doc_starts": starts, "doc_ids": self.ids}
        write_atomically(self.directory / "index" / (name[:-4] + ".json"),
                          json.dumps(index, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
        data = encode_header(self.dtype, self.chunk_size) + self.buffer.tobytes()
        write_atomically(self.directory / name, data)
        self.files.append({"name": name, "tokens": self.fill, "documents": len(starts),
                           "first_doc": self.docs_before, "sha256": hashlib.sha256(data).hexdigest()})
        self.docs_before += len(starts)
        self.counter += 1
        self.fill = 0
        self.starts, self.ids = [], []

    def state(self) -> tuple[dict, np.ndarray]:
        starts = np.concatenate(self.starts).tolist() if self.starts else []
        meta = {"fill": self.fill, "counter": self.counter, "docs_before": self.docs_before, "starts": starts,
                "ids": self.ids, "files": self.files}
        return meta, self.buffer[:self.fill].copy()

    def restore(self, meta: dict, buffer: np.ndarray) -> None:
        self.fill, self.counter, self.docs_before = meta["fill"], meta["counter"], meta["docs_before"]
        self.starts, self.ids, self.files = [np.asarray(meta["starts"], np.int64)], meta["ids"], meta["files"]
        self.buffer[:self.fill] = buffer
        # Chunks written after the saved state are recomputed (identically) from the inputs.
        for tmp in [*self.directory.glob(".*.tmp"), *self.directory.glob("index/.*.tmp")]:
            tmp.unlink()
        for path in self.directory.glob(f"{self.prefix}_*.bin"):
            if int(path.stem.rsplit("_", 1)[1]) >= self.counter:
                path.unlink()
                (self.directory / "index" / (path.stem + ".json")).unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------- tokenizing
_worker: dict = {}


def _init_worker(files, names, args_dict: dict) -> None:
    _worker.update(args_dict, files=files, names=names, tokenizer=Tokenizer(args_dict["tokenizer"]))


def validation_mask(ids, seed: int, val_fraction: float) -> np.ndarray:
    """True for documents of the validation split: a function of (seed, id) only.

    hash = splitmix64(crc32(id) XOR splitmix64(seed)); validation when hash < val_fraction * 2**64. (CRC32 alone is
    linear; the splitmix64 finalizer makes the result uniform. Cheaper than a cryptographic hash per document.)"""
    crc = np.fromiter((zlib.crc32(i.encode("utf-8")) for i in ids), np.uint64, len(ids))
    hashes = splitmix64(crc ^ splitmix64(np.array([seed % 2**64], np.uint64))[0])
    return hashes < np.uint64(min(int(val_fraction * 2.0**64), 2**64 - 1))


def tokenize_unit(unit: Unit) -> dict:
    """Documents of one unit, tokenized and assigned to train/val (runs in a worker process)."""
    w = _worker
    ids, texts, errors = parse_unit(unit, w["files"], w["names"], w["text_field"], w["id_field"])
    result = {"index": unit.index, "size": unit.size, "errors": errors, "empty": texts.count("")}
    if result["empty"]:
        ids, texts = zip(*[(i, t) for i, t in zip(ids, texts) if t]) if len(texts) > result["empty"] else ([], [])
    encoded = w["tokenizer"].encode_batch(texts, bos=w["bos"], eos=True)
    lengths = np.fromiter(map(len, encoded), np.int64, len(encoded))
    tokens = np.fromiter(chain.from_iterable(encoded), w["dtype"], int(lengths.sum()))
    is_val = validation_mask(ids, w["seed"], w["val_fraction"])
    if not is_val.any():  # the common case: no copies
        result["train"], result["val"] = (tokens, lengths, list(ids)), (tokens[:0], lengths[:0], [])
        return result
    token_is_val = np.repeat(is_val, lengths)
    for split, doc_mask, token_mask in (("train", ~is_val, ~token_is_val), ("val", is_val, token_is_val)):
        result[split] = (tokens[token_mask], lengths[doc_mask], [i for i, m in zip(ids, doc_mask) if m])
    return result


def ordered_results(units, workers: int, initargs: tuple):
    """Results of `tokenize_unit` in unit order, with at most a few units in flight (bounded memory)."""
    if workers <= 1:
        _init_worker(*initargs)
        yield from map(tokenize_unit, units)
        return
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    pool = context.Pool(workers, initializer=_init_worker, initargs=initargs)
    try:
        pending: deque = deque()
        units = iter(units)
        exhausted = False
        while pending or not exhausted:
            while not exhausted and len(pending) < 3 * workers:
                unit = next(units, None)
                if unit is None:
                    exhausted = True
                else:
                    pending.append(pool.apply_async(tokenize_unit, (unit,)))
            if pending:
                yield pending.popleft().get()
        pool.close()
    finally:
        pool.terminate()
        pool.join()


# ----------------------------------------------------------------------------------------------- bookkeeping
def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tokenizer_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.iterdir() if p.is_file() and p.name.startswith(("tokenizer", "special_tokens")))


def settings_fingerprint(args: argparse.Namespace, files: list[Path]) -> tuple[str, dict]:
    """A hash of everything the output depends on (inputs by path, size and mtime; tokenizer by content)."""
    stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    tok = {p.name: file_sha256(p) for p in tokenizer_files(args.tokenizer)}
    settings = {"format_version": FORMAT_VERSION, "inputs": stats, "tokenizer": tok, "text_field": args.text_field,
                "id_field": args.id_field, "chunk_size": args.chunk_size, "val_fraction": args.val_fraction,
                "seed": args.seed, "txt_docs_per_line": args.txt_docs_per_line, "bos": args.bos}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest(), tok


def read_manifest(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def save_state(out: Path, fingerprint: str, next_unit: int, stats: dict, writers: dict) -> None:
    meta, buffers = {"fingerprint": fingerprint, "next_unit": next_unit, "stats": stats, "writers": {}}, {}
    for split, writer in writers.items():
        meta["writers"][split], buffers[split] = writer.state()
    blob = io.BytesIO()
    np.savez(blob, meta=np.array(json.dumps(meta)), **buffers)
    write_atomically(out / STATE_FILE, blob.getvalue())


def load_state(out: Path, fingerprint: str) -> Optional[tuple[dict, dict]]:
    path = out / STATE_FILE
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            buffers = {split: data[split] for split in SPLITS}
    except (OSError, ValueError, KeyError):
        return None
    return (meta, buffers) if meta.get("fingerprint") == fingerprint else None


def prepare_output(args: argparse.Namespace, fingerprint: str) -> str:
    """'done' (nothing to do), 'resume' or 'fresh'; refuses to replace other data without --overwrite.

    Nothing in place is touched here: a fresh run only clears the staging area (an abandoned run of ours)."""
    out = args.output_dir
    manifests = [read_manifest(out / split / "manifest.json") for split in SPLITS]
    if all(m is not None and m.get("fingerprint") == fingerprint for m in manifests):
        return "done"
    if load_state(out / STAGING, fingerprint) is not None:
        return "resume"
    existing = [p for split in SPLITS for p in (out / split).glob("*")] if out.exists() else []
    if existing and not args.overwrite:
        raise InputError(f"--output_dir {out}: holds data prepared from other inputs or settings "
                         f"(pass --overwrite to replace it once the new data is complete, or choose another directory)")
    shutil.rmtree(out / STAGING, ignore_errors=True)
    return "fresh"


def move_into_place(out: Path) -> None:
    """Swap the staged splits in for the ones in place, then drop the old ones and the staging area."""
    for split in SPLITS:
        if (out / split).exists():
            (out / split).rename(out / STAGING / f"replaced-{split}")
        (out / STAGING / split).rename(out / split)
    shutil.rmtree(out / STAGING)


def write_manifest(args, split: str, writer: ChunkWriter, fingerprint: str, tokenizer: Tokenizer,
                   tok_hashes: dict, files: list[Path], stats: dict) -> None:
    manifest = {
        "format": "LITPKDS", "version": 1, "split": split, "prefix": writer.prefix, "dtype": writer.dtype.name,
        "chunk_size": writer.chunk_size, "pad_id": writer.pad_id, "bos": args.bos, "eos": True,
        "tokens": sum(f["tokens"] for f in writer.files), "documents": writer.docs_before,
        "files": writer.files,
        "tokenizer": {"path": str(args.tokenizer), "files_sha256": tok_hashes, "vocab_size": tokenizer.vocab_size,
                      "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id},
        "split_rule": {"val_fraction": args.val_fraction, "seed": args.seed,
                       "hash": "splitmix64(crc32(id) ^ splitmix64(seed)) < val_fraction * 2**64 -> val"},
        "inputs": [{"path": str(p), "bytes": p.stat().st_size} for p in files],
        "skipped_records": stats["skipped"], "empty_documents": stats["empty"], "fingerprint": fingerprint,
    }
    write_atomically(writer.directory / "manifest.json", json.dumps(manifest, indent=1).encode("utf-8"))


def validate(args: argparse.Namespace, tokenizer: Tokenizer) -> None:
    if args.chunk_size < 1:
        raise InputError(f"--chunk_size {args.chunk_size}: must be positive")
    if not 0 <= args.val_fraction < 1:
        raise InputError(f"--val_fraction {args.val_fraction}: must be in [0, 1)")
    if args.workers < 1:
        raise InputError(f"--workers {args.workers}: must be at least 1")
    if args.output_dir.exists() and not args.output_dir.is_dir():
        raise InputError(f"--output_dir {args.output_dir}: exists and is not a directory")
    if tokenizer.eos_id is None:
        raise InputError(f"--tokenizer {args.tokenizer}: has no EOS token to separate documents")
    if args.bos and tokenizer.bos_id is None:
        raise InputError(f"--tokenizer {args.tokenizer}: has no BOS token (pass --no-bos)")


def pad_id_for(tokenizer: Tokenizer) -> int:
    """The padding of the last chunk: the pad token, else <unk>; never a BOS/EOS separator."""
    # The last resort is the first id that is neither (0 is the separator in e.g. GPT-NeoX's tokenizer).
    for candidate in (tokenizer.pad_id, tokenizer.unk_id, 0, 1, 2):
        if candidate is not None and candidate not in (tokenizer.bos_id, tokenizer.eos_id):
            return candidate


# ----------------------------------------------------------------------------------------------- main
def run(args: argparse.Namespace) -> int:
    try:
        tokenizer = Tokenizer(args.tokenizer)
    except ValueError as e:
        raise InputError(f"--tokenizer {args.tokenizer}: {e}") from None
    validate(args, tokenizer)
    files = expand_inputs(args.input)
    fingerprint, tok_hashes = settings_fingerprint(args, files)
    mode = prepare_output(args, fingerprint)
    if mode == "done":
        print(f"{args.output_dir}: already prepared from these inputs and settings; nothing to do")
        return 0

    dtype = token_dtype(tokenizer.vocab_size)
    staging = args.output_dir / STAGING
    writers = {split: ChunkWriter(staging / split, split, args.chunk_size, dtype, pad_id_for(tokenizer))
               for split in SPLITS}
    stats = {"skipped": 0, "empty": 0, "documents": 0, "done_bytes": 0}
    next_unit = 0
    if mode == "resume":
        meta, buffers = load_state(staging, fingerprint)
        for split, writer in writers.items():
            writer.restore(meta["writers"][split], buffers[split])
        stats, next_unit = meta["stats"], meta["next_unit"]
        print(f"resuming an interrupted run at input unit {next_unit}")
    else:  # marks the directory as ours before the first chunk appears
        save_state(staging, fingerprint, 0, stats, writers)

    policy = ErrorPolicy(args.on_error)
    policy.count = stats["skipped"]
    worker_args = {"tokenizer": str(args.tokenizer), "text_field": args.text_field, "id_field": args.id_field,
                   "bos": args.bos, "seed": args.seed, "val_fraction": args.val_fraction, "dtype": dtype}
    units = (u for u in iter_units(files, args.txt_docs_per_line) if u.index >= next_unit)
    total_bytes = sum(p.stat().st_size for p in files)
    start, last_save = time.perf_counter(), time.perf_counter()
    new_tokens = 0
    with tqdm(total=total_bytes, initial=stats["done_bytes"], unit="B", unit_scale=True, desc="tokenizing",
              mininterval=1.0, file=sys.stderr) as bar:
        for result in ordered_results(units, args.workers, (files, document_names(files), worker_args)):
            policy.report(result["errors"])
            for split, writer in writers.items():
                tokens, lengths, ids = result[split]
                writer.add(tokens, lengths, ids)
                new_tokens += len(tokens)
                stats["documents"] += len(ids)
            stats["empty"] += result["empty"]
            stats["skipped"] = policy.count
            stats["done_bytes"] += result["size"]
            bar.update(result["size"])
            bar.set_postfix_str(f"{new_tokens / (time.perf_counter() - start):,.0f} tok/s", refresh=False)
            if time.perf_counter() - last_save > STATE_INTERVAL_S:
                save_state(staging, fingerprint, result["index"] + 1, stats, writers)
                last_save = time.perf_counter()

    if not writers["train"].docs_before and not writers["train"].fill:  # training would fail on it much later
        found = "no documents at all" if not stats["documents"] else "documents only for the validation split"
        raise InputError(f"--input: {found} ({stats['empty']} empty, {stats['skipped']} malformed records skipped)")
    for split, writer in writers.items():
        writer.finish()
        write_manifest(args, split, writer, fingerprint, tokenizer, tok_hashes, files, stats)
    move_into_place(args.output_dir)
    elapsed = time.perf_counter() - start
    summary = ", ".join(f"{s}: {sum(f['tokens'] for f in w.files):,} tokens in {w.docs_before:,} documents, "
                        f"{len(w.files)} chunks" for s, w in writers.items())
    print(f"{summary}; {stats['skipped']} malformed records skipped, {stats['empty']} empty documents; "
          f"{new_tokens / max(elapsed, 1e-9):,.0f} tokens/s with {args.workers} worker(s)")
    if not writers["val"].files and args.val_fraction > 0:
        print("warning: no document fell into the validation split", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
