"""Benchmark checkpoint verification on a checkpoint of a real model's size: seconds per GB.

    python bench/bench_verify.py --model_name LLaMmlein_1B --workdir /scratch/bench

Builds the full checkpoint the trainer writes for --model_name (fp32 weights plus AdamW's exp_avg and exp_avg_sq),
its tensors backed by a memory-mapped file of random bytes so that the benchmark needs no RAM of that size, then
times, on the same file:
1. save: `torch.save` of the state (what a full save costs anyway; the CRC-32s it writes are what is verified);
2. crc: `lit_gpt.checkpoint.verify.check_checkpoint` (every record's CRC-32; before a load and before rotation);
3. sha256: `lit_gpt.checkpoint.verify.sha256_file` (what a sharded save hashes; per rank, only its own shards).
Each check runs with the file's pages in the page cache ("warm", right after the save) and evicted ("cold",
posix_fadvise DONTNEED on this file only: reads come from the disk).
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lit_gpt.checkpoint import verify
from lit_gpt.config import Config
from lit_gpt.model import GPT
from lit_gpt.run_dir import RunDir


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name", default="LLaMmlein_1B")
    p.add_argument("--threads", type=int, default=verify.THREADS, help="verification threads")
    p.add_argument("--workdir", type=Path, help="where to write (default: a temp dir, removed afterwards)")
    return p.parse_args(argv)


def state_on_disk(config: Config, backing: Path) -> dict:
    """The full-checkpoint dict for `config`, its tensors views of one memory-mapped file of random bytes."""
    with torch.device("meta"):
        shapes = {name: tuple(p.shape) for name, p in GPT(config).named_parameters()}
    count = sum(int(np.prod(s)) for s in shapes.values())
    block = np.random.default_rng(0).standard_normal(1 << 24).astype(np.float32)  # 64 MiB, repeated
    with open(backing, "wb") as f:
        for start in range(0, 3 * count, block.size):
            f.write(block[:min(block.size, 3 * count - start)].tobytes())
    flat = torch.from_numpy(np.memmap(backing, dtype=np.float32, mode="c", shape=(3 * count,)))
    views, offset = {}, 0
    for kind in ("param", "exp_avg", "exp_avg_sq"):
        for name, shape in shapes.items():
            n = int(np.prod(shape))
            views[(kind, name)] = flat[offset:offset + n].view(shape)
            offset += n
    optimizer = {"state": {name: {"step": torch.tensor(1.0), "exp_avg": views[("exp_avg", name)],
                                  "exp_avg_sq": views[("exp_avg_sq", name)]} for name in shapes},
                 "param_groups": [{"lr": 4e-4, "params": list(shapes)}]}
    return {"model": {name: views[("param", name)] for name in shapes}, "optimizer": optimizer, "step_count": 1}


def evict(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def timed(label: str, fn, gigabytes: float) -> None:
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    print(f"{label:<14} {seconds:8.1f} s   {seconds / gigabytes:6.2f} s/GB   {gigabytes / seconds:6.2f} GB/s", flush=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    verify.THREADS = args.threads
    work = Path(tempfile.mkdtemp(dir=args.workdir))
    try:
        config = Config.from_name(args.model_name)
        state = state_on_disk(config, work / "backing.bin")
        ckpt = RunDir(work).checkpoint(1)
        timed("save", lambda state=state: (torch.save(state, ckpt), evict(ckpt)), (work / "backing.bin").stat().st_size / 1e9)
        del state
        (work / "backing.bin").unlink()
        gigabytes = ckpt.stat().st_size / 1e9
        print(f"{args.model_name}: full checkpoint of {gigabytes:.2f} GB, {args.threads} verification threads, "
              f"{os.cpu_count()} CPUs")
        for check, fn in (("crc", lambda: verify.check_checkpoint(ckpt)),
                          ("sha256", lambda: verify.sha256_file(ckpt))):
            for cache in ("cold", "warm"):
                if cache == "cold":
                    evict(ckpt)
                verify._verified.clear()  # measure the reading, not the memo
                timed(f"{check} {cache}", fn, gigabytes)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
