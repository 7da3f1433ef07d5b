"""Attention backends behind one function, with packed-document masking.

Backends: FlashAttention-3 (`flash_attn_interface`, Hopper), FlashAttention-2 (`flash_attn`), PyTorch SDPA and an
eager reference. `auto` picks the fastest one that can run the given inputs; asking for a specific backend that
cannot run them is an error, never a silent fallback.
"""
from __future__ import annotations

import importlib
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch
import torch.nn.functional as F

ENV_VAR = "LIT_GPT_ATTN_IMPL"


@lru_cache(maxsize=None)
def _import(module: str):
    try:
        return importlib.import_module(module)
    except Exception:  # a broken CUDA extension raises more than ImportError
        return None


def _flash_unavailable_reason(impl: str, q: torch.Tensor) -> Optional[str]:
    """Why the FlashAttention backend `impl` cannot run `q`, or None if it can."""
    module = "flash_attn_interface" if impl == "fa3" else "flash_attn"
    if _import(module) is None:
        return f"the package '{module}' is not importable"
    if not q.is_cuda:
        return f"inputs are on {q.device.type}, not CUDA"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {q.dtype} is not fp16/bf16"
    if impl == "fa3" and torch.cuda.get_device_capability(q.device)[0] != 9:
        return "FlashAttention-3 needs a Hopper GPU (compute capability 9.x)"
    return None


def resolve_impl(impl: str, q: torch.Tensor) -> str:
    """Turn `auto` (or the environment's choice) into a concrete backend that can run `q`."""
    if impl == "auto":
        impl = os.environ.get(ENV_VAR, "auto")
    if impl == "auto":
        for candidate in ("fa3", "fa2"):
            if _flash_unavailable_reason(candidate, q) is None:
                return candidate
        return "sdpa"
    if impl in ("fa3", "fa2"):
        reason = _flash_unavailable_reason(impl, q)
        if reason is not None:
            raise RuntimeError(f"attn_impl={impl!r} was requested but cannot run: {reason}")
        return impl
    if impl not in ("sdpa", "eager"):
        raise ValueError(f"Unknown attn_impl {impl!r} (set via config or ${ENV_VAR}); use auto, fa3, fa2, sdpa or eager")
    return impl


@dataclass
class DocumentMask:
    """Where packed documents start inside each [B, T] block; computed once per forward pass.

    `doc_ids[b, t]` is any integer that changes exactly where a new document starts within row b.
    """

    doc_ids: torch.Tensor  # [B, T]
    positions: torch.Tensor  # [B, T] position of each token inside its own document
    cu_seqlens: torch.Tensor  # [num_docs + 1] int32 offsets into the flattened B*T tokens (varlen kernels)
    max_seqlen: int

    @classmethod
    def from_doc_ids(cls, doc_ids: torch.Tensor) -> "DocumentMask":
        B, T = doc_ids.shape
        starts = torch.ones_like(doc_ids, dtype=torch.bool)
        starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
        index = torch.arange(T, device=doc_ids.device).expand(B, T)
        start_of_doc = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
        positions = index - start_of_doc
        flat_starts = starts.reshape(-1).nonzero().squeeze(1)
        total = torch.tensor([B * T], device=doc_ids.device)
        cu_seqlens = torch.cat([flat_starts, total]).to(torch.int32)
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        return cls(doc_ids, positions, cu_seqlens, max_seqlen)

    def bool_mask(self) -> torch.Tensor:
        """[B, 1, T, T] mask, True where query t may attend key s: causal and inside the same document."""
        T = self.doc_ids.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=self.doc_ids.device).tril()
        # Compare segment numbers, not raw ids: an id may recur later in the row for a different document.
        segment = (self.positions == 0).cumsum(dim=1)
        same_doc = segment[:, :, None] == segment[:, None, :]
        return (same_doc & causal)[:, None]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    impl: str = "auto",
    doc_mask: Optional[DocumentMask] = None,
    attn_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Causal attention. q: [B, T, n_head, D]; k, v: [B, S, n_kv, D] with n_head % n_kv == 0. Returns [B, T, n_head, D].

    `attn_mask` ([B or 1, 1, T, S] bool) replaces the causal mask, e.g. for decoding with a KV cache; it is
    supported by the SDPA and eager backends only.
    """
    impl = resolve_impl(impl, q)
    if attn_mask is not None and impl in ("fa3", "fa2"):
        impl = "sdpa"  # explicit masks (KV-cache decoding) go through SDPA, the kernel-agnostic path
    if impl in ("fa3", "fa2"):
        return _flash(q, k, v, impl, doc_mask)
    if attn_mask is None and doc_mask is not None:
        attn_mask = doc_mask.bool_mask()
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # -> [B, H, T, D]
    if impl == "sdpa":
        T, S = qt.shape[2], kt.shape[2]
        if attn_mask is None and T != S:
            # SDPA's is_causal is top-left aligned; eager and FlashAttention align the last query with the last key.
            attn_mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
        gqa = kt.shape[1] != qt.shape[1]
        y = F.scaled_dot_product_attention(
            qt, kt, vt, attn_mask=attn_mask, is_causal=attn_mask is None, enable_gqa=gqa
        )
    else:
        y = _eager(qt, kt, vt, attn_mask)
    return y.transpose(1, 2)


def _eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Reference implementation: explicit softmax(QK^T / sqrt(D)) V in fp32 accumulation."""
    repeats = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(repeats, dim=1)
    v = v.repeat_interleave(repeats, dim=1)
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    if attn_mask is None:
        T, S = q.shape[2], k.shape[2]
        attn_mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
    scores = scores.masked_fill(~attn_mask, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


def _flash(q, k, v, impl: str, doc_mask: Optional[DocumentMask]) -> torch.Tensor:
    mod = _import("flash_attn_interface" if impl == "fa3" else "flash_attn")
    if doc_mask is None:
        out = mod.flash_attn_func(q, k, v, causal=True)
    else:
        B, T = q.shape[:2]
        cu, n = doc_mask.cu_seqlens, doc_mask.max_seqlen
        flat = [x.reshape(B * T, *x.shape[2:]) for x in (q, k, v)]
        out = mod.flash_attn_varlen_func(*flat, cu, cu, n, n, causal=True)
        if isinstance(out, tuple):
            out = out[0]
        out = out.reshape(B, T, *out.shape[1:])
    # Some FlashAttention-3 releases return (out, softmax_lse).
    return out[0] if isinstance(out, tuple) else out
