"""Parts (the tokenized documents of one shard and split) and their packing into LITPKDS chunks.

A split is the concatenation of its parts in shard order; chunk c holds tokens [c * chunk_size, (c + 1) *
chunk_size) of it, so every chunk is a function of the corpus alone and tasks can write any range of chunks.
Chunk files and their document indexes are the format `lit_gpt.packed_dataset` and TinyLlama read: the last chunk
keeps the full size of its header, its tail is the pad id (never a BOS/EOS separator) and only its first `tokens`
entries are data.
"""
from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from lit_gpt.checkpoint.publish import write_atomically
from lit_gpt.data_pipeline.plan import SPLITS, Plan
from lit_gpt.litpkds import chunk_name, encode_header

DATASET = "dataset"  # OUTPUT/.staging/dataset/{train,val}: the new dataset until the switch


def part_paths(work: Path, shard: int, split: str) -> tuple[Path, Path]:
    base = Path(work) / "parts" / f"{shard:06d}.{split}"
    return base.with_name(base.name + ".bin"), base.with_name(base.name + ".docs.json")


def pack_result_path(work: Path, tasks: int, rank: int) -> Path:
    return Path(work) / "pack" / f"{tasks}-{rank:05d}.json"


class PartWriter:
    """Appends a shard's documents of one split to its part file (temporary name until `close`)."""

    def __init__(self, work: Path, shard: int, split: str, dtype: np.dtype) -> None:
        self.path, self.docs_path = part_paths(work, shard, split)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp")
        self.file = open(self.tmp, "wb")
        self.dtype = dtype
        self.tokens = 0
        self.lengths: list[int] = []
        self.ids: list[str] = []

    def add(self, tokens: np.ndarray, lengths: np.ndarray, ids: list[str]) -> None:
        self.file.write(tokens.astype(self.dtype, copy=False).tobytes())
        self.tokens += len(tokens)
        self.lengths.extend(lengths.tolist())
        self.ids.extend(ids)

    def close(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        self.tmp.replace(self.path)
        docs = {"lengths": self.lengths, "ids": self.ids}
        write_atomically(self.docs_path, json.dumps(docs, ensure_ascii=False).encode("utf-8"))


class Layout:
    """Where each split's tokens and documents are: shard offsets from the parts' metadata."""

    def __init__(self, work: Path, plan: Plan) -> None:
        self.work, self.plan = Path(work), plan
        self.dtype = np.dtype(plan.dtype)
        self.chunk_size, self.pad_id = plan.chunk_size, plan.pad_id
        metas = [json.loads((self.work / "parts" / f"{s.index:06d}.json").read_text()) for s in plan.shards]
        self.token_offsets = {split: np.cumsum([0] + [m[split]["tokens"] for m in metas]) for split in SPLITS}
        self.doc_offsets = {split: np.cumsum([0] + [m[split]["documents"] for m in metas]) for split in SPLITS}
        self._docs = lru_cache(maxsize=4)(self._load_docs)

    def tokens(self, split: str) -> int:
        return int(self.token_offsets[split][-1])

    def documents(self, split: str) -> int:
        return int(self.doc_offsets[split][-1])

    def chunks(self) -> list[tuple[str, int]]:
        return [(split, c) for split in SPLITS for c in range(-(-self.tokens(split) // self.chunk_size))]

    def directory(self, split: str) -> Path:
        return self.work / DATASET / split

    def _load_docs(self, split: str, shard: int) -> tuple[np.ndarray, list[str]]:
        """(global start positions, ids) of the shard's documents in the split."""
        docs = json.loads(part_paths(self.work, shard, split)[1].read_text(encoding="utf-8"))
        lengths = np.asarray(docs["lengths"], np.int64)
        starts = self.token_offsets[split][shard] + np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        return starts[:len(lengths)], docs["ids"]

    def write_chunk(self, split: str, c: int) -> dict:
        """Write chunk c of the split and its index; its manifest entry."""
        offsets = self.token_offsets[split]
        a = c * self.chunk_size
        b = min(a + self.chunk_size, self.tokens(split))
        buffer = np.full(self.chunk_size, self.pad_id, dtype=self.dtype)
        starts, ids = [], []
        first = int(np.searchsorted(offsets, a, side="right")) - 1  # the shard holding token a
        first_doc = None
        shard = first
        while shard < len(offsets) - 1 and offsets[shard] < b:
            lo, hi = max(a, int(offsets[shard])), min(b, int(offsets[shard + 1]))
            if hi > lo:
                path = part_paths(self.work, shard, split)[0]
                tokens = np.memmap(path, dtype=self.dtype, mode="r")
                buffer[lo - a:hi - a] = tokens[lo - offsets[shard]:hi - offsets[shard]]
                del tokens
            doc_starts, doc_ids = self._docs(split, shard)
            i, j = np.searchsorted(doc_starts, [a, b])
            if first_doc is None:
                first_doc = int(self.doc_offsets[split][shard]) + int(i)
            starts.extend((doc_starts[i:j] - a).tolist())
            ids.extend(doc_ids[i:j])
            shard += 1
        name = chunk_name(split, c)
        directory = self.directory(split)
        index = {"file": name, "chunk_size": self.chunk_size, "tokens": b - a, "pad_id": self.pad_id,
                 "first_doc": first_doc, "doc_starts": starts, "doc_ids": ids}
        write_atomically(directory / "index" / (name[:-4] + ".json"),
                         json.dumps(index, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
        data = encode_header(self.dtype, self.chunk_size) + buffer.tobytes()
        write_atomically(directory / name, data)
        return {"split": split, "name": name, "tokens": b - a, "documents": len(starts), "first_doc": first_doc,
                "sha256": hashlib.sha256(data).hexdigest()}
