"""The three products of a Linear layer's training step, torch's CPU matmul (MKL) against oneDNN (lit_gpt.cpu_linear).

    python bench/bench_linear.py                               # demo_25M's Linear shapes, 2048 tokens, 2 threads
    python bench/bench_linear.py --model_name LLaMmlein_120M --tokens 4096 --threads 8

For each Linear of the model (fused QKV, attention output, the MLP's three, lm_head): forward x @ W.T, input gradient
g @ W and weight gradient g.T @ x, each timed as the median of --repeats runs, the two libraries called in turns; the total
weights every shape by how often a training step computes it (per layer, once for lm_head).
"""
from __future__ import annotations

import argparse
import re
import statistics
import time

import torch

from lit_gpt.config import Config
from lit_gpt.cpu_linear import ONEDNN_LINEAR, onednn_linear
from lit_gpt.model import GPT, Linear

PRODUCTS = ("forward", "grad_input", "grad_weight")


def linear_shapes(cfg: Config) -> list[tuple[str, int, int, int]]:
    """(names, in_features, out_features, count per step) of the model's Linear layers, read off a meta-device GPT."""
    with torch.device("meta"):
        model = GPT(cfg)
    names: dict[tuple[int, int], list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, Linear):
            names.setdefault((module.in_features, module.out_features), []).append(re.sub(r"^transformer\.h\.\d+\.", "", name))
    return [(", ".join(dict.fromkeys(found)), n_in, n_out, len(found)) for (n_in, n_out), found in names.items()]


def product_pairs(x: torch.Tensor, w: torch.Tensor, g: torch.Tensor) -> dict:
    """Each product as (MKL, oneDNN) callables."""
    return {"forward": (lambda: x @ w.t(), lambda: onednn_linear(x, w)),
            "grad_input": (lambda: g @ w, lambda: onednn_linear(g, w.t())),
            "grad_weight": (lambda: g.t() @ x, lambda: onednn_linear(g.t(), x.t()))}


def median_seconds(fns, repeats: int) -> list[float]:
    """Median time of each function, called in turns (a shared machine's slow spells hit all of them alike)."""
    times: list[list[float]] = [[] for _ in fns]
    for i in range(repeats + 1):
        for fn, own in zip(fns, times):
            start = time.perf_counter()
            fn()
            if i:  # the first call of each is a warm-up
                own.append(time.perf_counter() - start)
    return [statistics.median(own) for own in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name", default="demo_25M")
    parser.add_argument("--tokens", type=int, default=2048, help="rows of x (micro batch x sequence length)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    if not ONEDNN_LINEAR:
        raise SystemExit("oneDNN's linear is not available in this torch build (x86 CPU builds have it)")
    torch.set_num_threads(args.threads)
    cfg = Config.from_name(args.model_name)
    totals = {"mkl": 0.0, "onednn": 0.0}
    print(f"{args.model_name}, {args.tokens} tokens, {args.threads} threads, fp32; ms per product (median)\n")
    print("| Linear | in x out | product | MKL | oneDNN | MKL / oneDNN |\n|---|---|---|---:|---:|---:|")
    for name, n_in, n_out, count in linear_shapes(cfg):
        x, w, g = torch.randn(args.tokens, n_in), torch.randn(n_out, n_in), torch.randn(args.tokens, n_out)
        candidates = product_pairs(x, w, g)
        for product in PRODUCTS:
            mkl, onednn = median_seconds(candidates[product], args.repeats)
            totals["mkl"] += mkl * count
            # what lit_gpt.cpu_linear computes: the weight gradient stays on MKL
            totals["onednn"] += (mkl if product == "grad_weight" else onednn) * count
            print(f"| {name} | {n_in} x {n_out} | {product} | {mkl * 1e3:.1f} | {onednn * 1e3:.1f} | "
                  f"{mkl / onednn:.2f}x |")
    print(f"\nAll Linear products of one training step: MKL {totals['mkl'] * 1e3:.0f} ms, lit_gpt.cpu_linear "
          f"{totals['onednn'] * 1e3:.0f} ms ({totals['mkl'] / totals['onednn']:.2f}x)")


if __name__ == "__main__":
    main()
