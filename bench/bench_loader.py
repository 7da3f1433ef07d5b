"""Loader throughput from page-cached chunks: our StepLoader vs litdata's StreamingDataset over the same tokens.

    .venv-bench/bin/python bench/bench_loader.py [--tokens 100000000] [--num_workers 0,2]

(litdata lives in its own venv: bash bench/setup_env.sh; without litdata only our loader is measured.)
Both read the same random token stream (uint16, vocab 32,000), written once as LITPKDS chunks for us and once
through `litdata.optimize` with a `TokensLoader`; both shuffle, produce micro-batches of b x (T + 1) tokens and
hand the trainer int64 `input_ids`/`labels` of b x T (for litdata that split and cast are timed as part of its
loop, as in the TinyLlama/LitGPT trainers). Every file is read once before timing, so the page cache holds both.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lit_gpt.litpkds import chunk_name, encode_header
from lit_gpt.packed_dataset import PackedDataset, StepLoader

CHUNK_TOKENS = 2049 * 1024  # TinyLlama's chunk size
# Both loaders read ahead (ours up to 2 groups of 64 steps per worker); a warm-up longer than that makes the timed
# part measure the steady rate at which batches are produced, not a queue filled before the clock started.
WARMUP_BATCHES = 600


def write_chunks(directory: Path, files: int, chunk_tokens: int = CHUNK_TOKENS, vocab_size: int = 32000,
                 seed: int = 0) -> list[Path]:
    """Random uint16 tokens as full LITPKDS chunks (TinyLlama layout, no manifest)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(files):
        path = directory / chunk_name("train", i)
        data = rng.integers(0, vocab_size, size=chunk_tokens, dtype=np.uint16)
        path.write_bytes(encode_header(np.uint16, chunk_tokens) + data.tobytes())
        paths.append(path)
    return paths


def warm_page_cache(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                while f.read(1 << 24):
                    pass


def time_ours(directory: Path, block: int, batch: int, batches: int, workers: int) -> float:
    ds = PackedDataset([directory], block_size=block, seed=42)
    loader = iter(StepLoader(ds, batch, batch, num_workers=workers))
    for _ in range(WARMUP_BATCHES):  # start-up, and the batches workers read ahead, outside the timing
        next(loader)
    start = time.perf_counter()
    for _ in range(batches):
        _, (mb,) = next(loader)
        assert mb["input_ids"].shape == (batch, block)
    return batches * batch * block / (time.perf_counter() - start)


def litdata_optimize(chunks: list[Path], output: Path) -> None:
    from litdata import TokensLoader, optimize

    optimize(fn=_chunk_tokens, inputs=[str(p) for p in chunks], output_dir=str(output), chunk_size=CHUNK_TOKENS,
             item_loader=TokensLoader(), num_workers=min(len(chunks), os.cpu_count() or 1), verbose=False)


def _chunk_tokens(path: str):
    import torch

    yield torch.from_numpy(np.fromfile(path, dtype=np.uint16, offset=24).astype(np.int32))


def time_litdata(directory: Path, block: int, batch: int, batches: int, workers: int) -> float:
    from litdata import StreamingDataLoader, StreamingDataset, TokensLoader

    ds = StreamingDataset(str(directory), item_loader=TokensLoader(block_size=block + 1), shuffle=True, seed=42,
                          drop_last=True)
    loader = iter(StreamingDataLoader(ds, batch_size=batch, num_workers=workers))
    for _ in range(WARMUP_BATCHES):
        next(loader)
    start = time.perf_counter()
    for _ in range(batches):
        data = next(loader)
        input_ids, labels = data[:, :-1].contiguous().long(), data[:, 1:].contiguous().long()
        assert input_ids.shape == (batch, block) and labels.shape == (batch, block)
    return batches * batch * block / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tokens", type=int, default=100_000_000)
    p.add_argument("--block_size", type=int, default=2048)
    p.add_argument("--micro_batch_size", type=int, default=8)
    p.add_argument("--batches", type=int, default=1000)
    p.add_argument("--num_workers", default="0,2", help="comma-separated worker counts, each measured")
    p.add_argument("--repeats", type=int, default=5, help="timings per contender, alternating ours and litdata")
    args = p.parse_args()
    try:
        import litdata
    except ImportError:
        litdata = None
        print("litdata not installed (see bench/requirements-bench.txt): measuring our loader only", file=sys.stderr)

    with tempfile.TemporaryDirectory() as tmp:
        ours, theirs = Path(tmp) / "litpkds", Path(tmp) / "litdata"
        chunks = write_chunks(ours, max(1, args.tokens // CHUNK_TOKENS))
        if litdata is not None:
            litdata_optimize(chunks, theirs)
            warm_page_cache(theirs)
        warm_page_cache(ours)
        for workers in (int(w) for w in args.num_workers.split(",")):
            shape = (args.block_size, args.micro_batch_size, args.batches, workers)
            timings: dict[str, list[float]] = {"ours": [], "litdata": []}
            for _ in range(args.repeats):  # alternate, so that a noisy neighbour slows both alike
                timings["ours"].append(time_ours(ours, *shape))
                if litdata is not None:
                    timings["litdata"].append(time_litdata(theirs, *shape))
            result = {"tokens": len(chunks) * CHUNK_TOKENS, "block_size": args.block_size,
                      "micro_batch_size": args.micro_batch_size, "batches": args.batches, "num_workers": workers,
                      "ours_tokens_per_s": [round(t) for t in timings["ours"]]}
            if litdata is not None:
                result["litdata_version"] = litdata.__version__
                result["litdata_tokens_per_s"] = [round(t) for t in timings["litdata"]]
                result["speedup_best"] = round(max(timings["ours"]) / max(timings["litdata"]), 2)
                result["speedup_median"] = round(statistics.median(timings["ours"])
                                                 / statistics.median(timings["litdata"]), 2)
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
