"""How long a sharded checkpoint blocks training: synchronous save vs asynchronous save, same model, same ranks.

    python bench/bench_async_checkpoint.py [--ranks 2] [--width 1024] [--layers 16] [--saves 3] [--fsdp 1|2] [--dir DIR]

--ranks processes (gloo, CPU) train an FSDP-wrapped (FSDP1, or FSDP2 with --fsdp 2) stack of --layers Linear(width, width) layers with AdamW
(parameters and both moments: 12 bytes per parameter, 200 MB at the defaults), checkpointing --saves times each way:

- synchronous: `save_checkpoint(..., "sharded")`; the whole call blocks;
- asynchronous: `AsyncCheckpointer.start` (the copy to host memory) blocks, training steps go on while the files are
  written, and `finish` (gather the digests, rename, rotate) blocks once every rank's write is done, learnt from the
  per-step all-reduce as the trainer does.

Reported (medians over the saves, the slowest rank): the blocking time of each way and their ratio, the background
write's duration, and the training step time before and during the background write (the write competes with the
step for the CPU). The files go to --dir (default: a temporary directory), which sets what a write costs.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lit_gpt.checkpoint.async_save import AsyncCheckpointer
from lit_gpt.checkpoint.save import save_checkpoint
from lit_gpt.run_dir import RunDir


def build(width: int, layers: int, fsdp: int):
    """FSDP1 (state dict of ShardedTensors, made with collectives) or FSDP2 (DTensors) over the layer stack."""
    torch.manual_seed(0)
    stack = torch.nn.Sequential(*(torch.nn.Linear(width, width) for _ in range(layers)))
    if fsdp == 1:
        from torch.distributed.fsdp import FullyShardedDataParallel

        model = FullyShardedDataParallel(stack, use_orig_params=True, device_id=torch.device("cpu"))
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for layer in stack:
            fully_shard(layer, mesh=mesh)
        model = fully_shard(stack, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return model, optimizer


def step(model, optimizer, width: int, written: bool = False) -> bool:
    """One training step; its all-reduce also counts the ranks whose checkpoint write is done (as the trainer's)."""
    model(torch.randn(8, width)).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    flag = torch.tensor([float(written)])
    dist.all_reduce(flag)
    return int(flag.item()) == dist.get_world_size()


def worker(rank: int, args, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")  # FSDP1's ShardedTensor deprecation notes, once per tensor
    dist.init_process_group("gloo", rank=rank, world_size=args.ranks)

    model, optimizer = build(args.width, args.layers, args.fsdp)
    step(model, optimizer, args.width)  # AdamW's moments exist from here on
    run = RunDir(Path(args.dir) / "run")
    quiet = dict(keep_last=1)
    timings = {"sync_s": [], "async_block_s": [], "async_start_s": [], "async_finish_s": [], "async_write_s": [], "step_s": [], "step_during_write_s": []}
    n = 0
    for _ in range(args.saves):
        n += 1
        dist.barrier()
        t = time.perf_counter()
        save_checkpoint(run.checkpoint(n), model, optimizer, {"step": n}, "sharded", **quiet)
        timings["sync_s"].append(time.perf_counter() - t)

    checkpointer = AsyncCheckpointer(log=lambda m: None, **quiet)
    for _ in range(args.saves):
        n += 1
        for _ in range(3):  # steps without a write, for comparison
            t = time.perf_counter()
            step(model, optimizer, args.width)
            timings["step_s"].append(time.perf_counter() - t)
        dist.barrier()
        t = time.perf_counter()
        checkpointer.start(run.checkpoint(n), model, optimizer, {"step": n})
        started = time.perf_counter()
        blocked = started - t
        while True:
            t = time.perf_counter()
            all_written = step(model, optimizer, args.width, checkpointer.done_locally())
            timings["step_during_write_s"].append(time.perf_counter() - t)
            if all_written:
                break
        timings["async_write_s"].append(time.perf_counter() - started)
        t = time.perf_counter()
        checkpointer.finish()
        timings["async_start_s"].append(blocked)
        timings["async_finish_s"].append(time.perf_counter() - t)
        timings["async_block_s"].append(blocked + time.perf_counter() - t)
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]  # this rank's shard
    state_bytes = sum(p.numel() * p.element_size() * 3 for p in local)  # and its two moments
    results[rank] = {**{key: statistics.median(values) for key, values in timings.items()}, "state_mb": state_bytes / 1e6}
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--saves", type=int, default=3)
    p.add_argument("--fsdp", type=int, choices=(1, 2), default=1, help="FSDP1 (the trainer's --strategy fsdp) or FSDP2")
    p.add_argument("--dir", default="", help="where the checkpoints are written; default: a temporary directory")
    args = p.parse_args()
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory(dir=args.dir or None) as tmp:
        args.dir = tmp
        results = mp.Manager().dict()
        mp.spawn(worker, args=(args, port, results), nprocs=args.ranks, join=True)
    worst = {key: max(r[key] for r in results.values()) for key in results[0]}
    total_mb = sum(r["state_mb"] for r in results.values())
    print(f"{args.ranks} ranks (gloo, CPU), FSDP{args.fsdp if args.fsdp == 2 else ''} over {args.layers} x Linear({args.width}, {args.width}) + AdamW: "
          f"{total_mb:.0f} MB of state; medians of {args.saves} saves, slowest rank")
    rows = [("synchronous save (blocks training)", worst["sync_s"]),
            ("async save: blocks training (copy + publish)", worst["async_block_s"]),
            ("  of which: start (state dict, copy to host memory)", worst["async_start_s"]),
            ("  of which: finish (gather, publish, rotate)", worst["async_finish_s"]),
            ("async save: background write (training goes on)", worst["async_write_s"]),
            ("training step, no write", worst["step_s"]),
            ("training step, during the background write", worst["step_during_write_s"])]
    for name, seconds in rows:
        print(f"  {name:<50} {seconds * 1000:9.1f} ms")
    print(f"  training blocked: synchronous / async = {worst['sync_s'] / worst['async_block_s']:.1f}x")


if __name__ == "__main__":
    main()
