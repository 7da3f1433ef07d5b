"""A small prepared train/val dataset for the GPU check, written with the project's own chunk writer.

    python bench/gpu_data.py OUT_DIR [--vocab_size 512] [--tokens 400000]

The GPU machine has neither datatrove (scripts/prepare_data.py) nor a network, so the check writes its data here:
documents of token ids generated from a seed (each an arithmetic progression modulo the vocabulary with a per-document
start and stride, plus noise: a pattern a tiny model learns within a few steps), packed by
`lit_gpt.data_pipeline.packing` into LITPKDS chunks with their document indexes and a manifest the trainer reads
(no tokenizer: run the trainer with --tokenizer_path "").
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from lit_gpt.checkpoint.publish import write_atomically
from lit_gpt.data_pipeline.packing import Layout, PartWriter
from lit_gpt.data_pipeline.plan import SPLITS
from lit_gpt.litpkds import token_dtype

PAD_ID = 0


class _PackingPlan(SimpleNamespace):
    """The fields of a preparation plan that `Layout` reads (dtype, chunk_size, pad_id, shards): the rest of a plan
    describes a corpus, which this data has not."""


def synthetic_documents(n_tokens: int, vocab_size: int, seed: int) -> list[np.ndarray]:
    """Documents of 50..600 tokens adding up to about n_tokens; ids in [1, vocab_size) (0 is the pad id)."""
    rng = np.random.default_rng(seed)
    docs, total = [], 0
    while total < n_tokens:
        length = int(rng.integers(50, 600))
        start, stride = int(rng.integers(1, vocab_size)), int(rng.integers(1, 8))
        ids = (start + stride * np.arange(length)) % (vocab_size - 1) + 1
        noisy = rng.random(length) < 0.05
        ids[noisy] = rng.integers(1, vocab_size, int(noisy.sum()))
        docs.append(ids)
        total += length
    return docs


def write_dataset(out: Path, vocab_size: int = 512, n_tokens: int = 400_000, chunk_size: int = 4096,
                  val_fraction: float = 0.1, seed: int = 0) -> dict:
    """Write OUT/train and OUT/val (chunks, indexes, manifest.json); their paths."""
    out = Path(out)
    work = out / ".work"
    shutil.rmtree(work, ignore_errors=True)
    dtype = token_dtype(vocab_size)
    docs = synthetic_documents(n_tokens, vocab_size, seed)
    n_val = max(1, int(len(docs) * val_fraction))
    by_split = {"val": docs[:n_val], "train": docs[n_val:]}
    meta = {}
    for split in SPLITS:
        writer = PartWriter(work, 0, split, dtype)
        split_docs = by_split[split]
        if split_docs:
            writer.add(np.concatenate(split_docs), np.array([len(d) for d in split_docs]),
                       [f"{split}-{i}" for i in range(len(split_docs))])
        writer.close()
        meta[split] = {"tokens": writer.tokens, "documents": len(split_docs)}
    (work / "parts" / "000000.json").write_text(json.dumps(meta))
    plan = _PackingPlan(dtype=dtype.name, chunk_size=chunk_size, pad_id=PAD_ID, shards=[SimpleNamespace(index=0)])
    layout = Layout(work, plan)
    files = {split: [] for split in SPLITS}
    for split, c in layout.chunks():
        entry = layout.write_chunk(split, c)
        files[entry.pop("split")].append(entry)
    paths = {}
    for split in SPLITS:
        body = {"format": "LITPKDS", "version": 1, "split": split, "prefix": split, "dtype": dtype.name,
                "chunk_size": chunk_size, "pad_id": PAD_ID, "bos": False, "eos": True,
                "tokens": layout.tokens(split), "documents": layout.documents(split), "files": files[split],
                "tokenizer": {"vocab_size": vocab_size},
                "fingerprint": hashlib.sha256(json.dumps(files[split]).encode()).hexdigest()}
        write_atomically(layout.directory(split) / "manifest.json", json.dumps(body, indent=1).encode("utf-8"))
        target = out / split
        shutil.rmtree(target, ignore_errors=True)
        layout.directory(split).rename(target)
        paths[split] = target
    shutil.rmtree(work)
    return paths


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--vocab_size", type=int, default=512)
    p.add_argument("--tokens", type=int, default=400_000)
    args = p.parse_args()
    for split, path in write_dataset(args.out, args.vocab_size, args.tokens).items():
        print(f"{split}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
