"""Peak memory and time of the training loss: lit_gpt.loss.token_losses against F.cross_entropy on an fp32 copy of the
logits (what the trainer did before, and what most training loops do), forward and backward, bf16 logits.

    python bench/bench_loss.py                          # CPU: 4 x 2048 x 32,064 (each contender in its own process)
    python bench/bench_loss.py --device cuda --batch 8  # GPU: 8 x 2048 x 32,064, torch.cuda.max_memory_allocated

Memory is the peak above what the bf16 logits themselves take (CPU: peak RSS of a fresh process minus its RSS with the
logits allocated; CUDA: allocator peak minus the logits), median time over --repeats runs.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from lit_gpt.loss import token_losses

CONTENDERS = ("chunked", "cross_entropy_fp32")


def loss_step(name: str, logits: torch.Tensor, labels: torch.Tensor) -> None:
    x = logits.detach().requires_grad_()
    if name == "chunked":
        objective = token_losses(x, labels)[1]
    else:
        objective = F.cross_entropy(x.reshape(-1, x.shape[-1]).float(), labels.reshape(-1), reduction="sum")
    objective.backward()
    assert x.grad is not None


def measure(name: str, args) -> dict:
    device = torch.device(args.device)
    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(args.batch, args.seq, args.vocab, device=device, dtype=torch.bfloat16, generator=g)
    labels = torch.randint(0, args.vocab, (args.batch, args.seq), device=device, generator=g)
    logits_bytes = logits.numel() * logits.element_size()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_now()
    for i in range(args.repeats + 1):
        start = time.perf_counter()
        loss_step(name, logits, labels)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:  # the first run warms up allocators and kernels
            times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda" else _peak_rss()) - base
    return {"contender": name, "peak_extra_gib": peak / 2**30, "logits_gib": logits_bytes / 2**30,
            "median_s": statistics.median(times)}


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32064)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", choices=CONTENDERS, help=argparse.SUPPRESS)  # one contender in this process
    args = p.parse_args()
    if args.only:
        print(json.dumps(measure(args.only, args)))
        return
    rows = []
    for name in CONTENDERS:  # a fresh process each: peak RSS cannot be reset within one
        cmd = [sys.executable, __file__, "--only", name] + sys.argv[1:]
        rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
    print(f"loss forward+backward, {args.batch} x {args.seq} x {args.vocab} bf16 logits on {args.device}")
    print("| contender | peak memory above the logits (GiB) | x logits | median time (s) |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['contender']} | {r['peak_extra_gib']:.2f} | {r['peak_extra_gib'] / r['logits_gib']:.2f} | "
              f"{r['median_s']:.3f} |")
    ratio = rows[1]["peak_extra_gib"] / max(rows[0]["peak_extra_gib"], 1e-9)
    print(f"chunked needs {ratio:.1f}x less extra memory")


if __name__ == "__main__":
    main()
