"""Attention kernels alone: forward and forward+backward TFLOP/s per backend, causal and document-masked.

    python bench/bench_attention.py --device cuda --json_out OUT/attention_bench.json
    python bench/bench_attention.py --device cpu --quick         # tiny shapes on the CPU kernels (a smoke run)

Backends: SDPA once per kernel it has on the device (CUDA: flash, memory-efficient, cuDNN, math; CPU: flash, math),
each forced with torch.nn.attention.sdpa_kernel (a kernel that rejects the inputs is listed as skipped with
PyTorch's reason), flex_attention (compiled; CUDA) and fa2/fa3/fa4 where importable, all through
lit_gpt.attention.attention with the mask prepare_mask builds for that backend, as the model calls them.
Shapes: the query/key-value heads and head size of LLaMmlein_1B and LLaMmlein_7B, sequence 2048 and 8192, 16384
tokens per call; bf16 on CUDA, fp32 on the CPU. Document masks: documents of random lengths (mean T/4).

FLOPs count only the unmasked scores (FlashAttention's convention): forward 4 * D * H * (number of query-key pairs
attended), forward+backward 3.5 times that (the backward recomputes the scores: 2.5x the forward). The JSON is
rewritten after every row, so a run stopped by a time limit keeps what it measured.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from lit_gpt.attention import (
    DocumentMask,
    attention,
    flash_backend_problem,
    prepare_mask,
    resolve_backend,
)
from lit_gpt.config import Config

FLOP_CONVENTION = ("unmasked query-key pairs only: forward 4*D*H*pairs, forward+backward 3.5x the forward "
                   "(FlashAttention's convention)")
TOKENS_PER_CALL = 16384


def sdpa_kernels(device: torch.device) -> dict:
    from torch.nn.attention import SDPBackend

    if device.type == "cuda":
        return {"sdpa:flash": SDPBackend.FLASH_ATTENTION, "sdpa:efficient": SDPBackend.EFFICIENT_ATTENTION,
                "sdpa:cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa:math": SDPBackend.MATH}
    return {"sdpa:flash": SDPBackend.FLASH_ATTENTION, "sdpa:math": SDPBackend.MATH}


def document_ids(batch: int, seq_len: int, seed: int) -> np.ndarray:
    """[B, T] ids changing where a document starts; lengths exponential with mean T/4 (at least 1)."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((batch, seq_len), dtype=np.int64)
    for row in ids:
        starts = np.cumsum(np.maximum(1, rng.exponential(seq_len / 4, size=seq_len)).astype(np.int64))
        row[starts[starts < seq_len]] = 1
        row[:] = np.cumsum(row)
    return ids


def attended_pairs(doc_ids: np.ndarray | None, batch: int, seq_len: int) -> int:
    """Query-key pairs a causal (document-)masked attention computes."""
    if doc_ids is None:
        return batch * seq_len * (seq_len + 1) // 2
    lengths = np.concatenate([np.unique(row, return_counts=True)[1] for row in doc_ids])
    return int((lengths * (lengths + 1) // 2).sum())


def time_call(fn, device: torch.device, min_seconds: float, max_iters: int) -> float:
    """Seconds per call: one warm-up call, then calls until min_seconds or max_iters."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    start, n = time.perf_counter(), 0
    while n < max_iters and (n == 0 or time.perf_counter() - start < min_seconds):
        fn()
        n += 1
    sync()
    return (time.perf_counter() - start) / n


def backends(device: torch.device, dtype: torch.dtype, head_size: int) -> dict:
    """name -> (impl, sdpa kernel or None) for every backend here, or name -> reason it is left out."""
    out = {name: ("sdpa", kernel) for name, kernel in sdpa_kernels(device).items()}
    for impl in ("flex", "fa3", "fa4", "fa2"):
        try:
            resolve_backend(impl, device, dtype, head_size, needs_grad=True)
            out[impl] = (impl, None)
        except ValueError as e:
            out[impl] = str(e) if impl == "flex" else (flash_backend_problem(impl) or str(e))
    return out


def measure(args) -> int:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.quick:
        models, seq_lens, tokens = {"micro": Config.from_name("micro")}, [64, 128], 256
    else:
        models = {name: Config.from_name(name) for name in args.models.split(",")}
        seq_lens, tokens = [int(t) for t in args.seq_lens.split(",")], TOKENS_PER_CALL
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    result = {"device": name, "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__,
              "flop_convention": FLOP_CONVENTION, "rows": []}

    def save():
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(result, indent=1))

    cases = [(model_name, c, seq_len, masking) for model_name, c in models.items() for seq_len in seq_lens
             for masking in ("causal", "document")]
    # Backend by backend over all shapes, the ones without compilation first: flex compiles per shape, and a run
    # stopped by its time limit should have lost the fewest rows.
    order = [*sdpa_kernels(device), "fa3", "fa4", "fa2", "flex"]
    for backend in order:
        for model_name, c, seq_len, masking in cases:
            entry = backends(device, dtype, c.head_size)[backend]
            batch = max(1, tokens // seq_len)
            row = {"model": model_name, "heads": f"{c.n_head}/{c.n_query_groups}x{c.head_size}",
                   "seq_len": seq_len, "batch": batch, "mask": masking, "backend": backend}
            if isinstance(entry, str):
                row["skipped"] = entry
            else:
                g = torch.Generator(device=device).manual_seed(0)
                q, k, v = (torch.randn(batch, seq_len, heads, c.head_size, generator=g, device=device, dtype=dtype)
                           for heads in (c.n_head, c.n_query_groups, c.n_query_groups))
                doc_ids = document_ids(batch, seq_len, seed=1) if masking == "document" else None
                doc_mask = None if doc_ids is None else DocumentMask.from_doc_ids(doc_ids).to(device)
                forward_flops = 4 * c.head_size * c.n_head * attended_pairs(doc_ids, batch, seq_len)
                row.update(run_backend(entry, q, k, v, doc_mask, forward_flops, device, dtype, args))
                del q, k, v
            result["rows"].append(row)
            save()
            print(json.dumps(row), flush=True)
    save()
    return 0 if any("skipped" not in r for r in result["rows"]) else 1


def run_backend(entry, q, k, v, doc_mask, forward_flops: int, device, dtype, args) -> dict:
    from torch.nn.attention import sdpa_kernel

    impl, kernel = entry
    if impl == "flex" and device.type == "cpu":
        return {"skipped": "flex_attention has no backward pass on the CPU"}
    try:
        mask = prepare_mask(impl, doc_mask, q.shape[1], k.shape[1], device, dtype)
        qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))

        def forward():
            with torch.no_grad(), (sdpa_kernel([kernel]) if kernel is not None else nullcontext()):
                attention(q, k, v, impl, mask)

        def forward_backward():
            with sdpa_kernel([kernel]) if kernel is not None else nullcontext():
                out = attention(qg, kg, vg, impl, mask)
            out.backward(torch.ones_like(out))

        fwd = time_call(forward, device, args.min_seconds, args.max_iters)
        fwd_bwd = time_call(forward_backward, device, args.min_seconds, args.max_iters)
    except (RuntimeError, ValueError, NotImplementedError) as e:  # a kernel that rejects these inputs says why
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {"skipped": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    return {"forward_ms": fwd * 1e3, "forward_tflops": forward_flops / fwd / 1e12,
            "fwd_bwd_ms": fwd_bwd * 1e3, "fwd_bwd_tflops": 3.5 * forward_flops / fwd_bwd / 1e12}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    p.add_argument("--models", default="LLaMmlein_1B,LLaMmlein_7B")
    p.add_argument("--seq_lens", default="2048,8192")
    p.add_argument("--quick", action="store_true", help="tiny shapes (the micro model, sequence 64 and 128)")
    p.add_argument("--min_seconds", type=float, default=0.1, help="timed seconds per measurement (at least)")
    p.add_argument("--max_iters", type=int, default=20)
    p.add_argument("--json_out", default="")
    return measure(p.parse_args())


if __name__ == "__main__":
    sys.exit(main())
