"""Attention backends behind one function, with packed-document masking.

Backends: FlashAttention-3 (`flash_attn_interface`, Hopper), FlashAttention-4 (`flash_attn.cute`, CuTe DSL, Hopper and
Blackwell), FlashAttention-2 (`flash_attn`), PyTorch flex_attention, SDPA and an eager reference.

The model resolves the backend once per forward pass (`resolve_backend`) and builds the mask that backend needs once
(`prepare_mask`), both outside any compiled region; each layer's `attention` call then dispatches on a plain string,
which torch.compile traces without graph breaks. `auto` picks the fastest backend that can run the inputs; asking for
a specific backend that cannot run them is an error, never a silent fallback.
"""
from __future__ import annotations

import importlib
import inspect
import math
import os
from dataclasses import dataclass
from functools import cache, lru_cache
from types import ModuleType
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import library  # custom ops: the flash kernels, opaque to dynamo

try:  # torch >= 2.5
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # pragma: no cover
    BlockMask = create_block_mask = flex_attention = None

ENV_VAR = "LIT_GPT_ATTN_IMPL"
BACKENDS = ("fa3", "fa4", "fa2", "flex", "sdpa", "eager")
FLASH_BACKENDS = ("fa3", "fa4", "fa2")


class AttentionUnavailable(ValueError):
    """An explicitly requested attention backend cannot run the given inputs."""


# ------------------------------------------------------------------------------------------------ document masks
@dataclass
class DocumentMask:
    """Where packed documents lie inside each [B, T] block: what every backend needs to keep them apart.

    Built on the host (numpy) by the data loader, so that the training step needs no device synchronisation; move it
    with `.to(device, non_blocking=True)`.
    """

    segments: torch.Tensor  # [B, T] int64: number of each token's document within its row (0, 1, ...)
    positions: torch.Tensor  # [B, T] int64: position of each token inside its own document
    cu_seqlens: torch.Tensor  # [num_docs + 1] int32 offsets of the documents in the flattened B*T tokens (varlen)
    max_seqlen: int  # longest document

    @classmethod
    def from_doc_ids(cls, doc_ids: np.ndarray | torch.Tensor) -> DocumentMask:
        """`doc_ids[b, t]` is any integer that changes exactly where a new document starts within row b.

        Computed in numpy; a device tensor is copied to the host and the result moved back (one synchronisation).
        """
        device = doc_ids.device if isinstance(doc_ids, torch.Tensor) else torch.device("cpu")
        ids = doc_ids.cpu().numpy() if isinstance(doc_ids, torch.Tensor) else np.asarray(doc_ids)
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise ValueError(f"doc_ids must have shape [B, T] with T > 0, got {list(ids.shape)}")
        B, T = ids.shape
        starts = np.ones((B, T), dtype=bool)
        starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
        index = np.arange(T, dtype=np.int64)
        positions = index - np.maximum.accumulate(np.where(starts, index, 0), axis=1)
        cu_seqlens = np.append(np.flatnonzero(starts), B * T).astype(np.int32)
        mask = cls(
            segments=torch.from_numpy(starts.cumsum(axis=1, dtype=np.int64) - 1),
            positions=torch.from_numpy(positions),
            cu_seqlens=torch.from_numpy(cu_seqlens),
            max_seqlen=int(np.diff(cu_seqlens).max()),
        )
        return mask.to(device)

    def to(self, device, non_blocking: bool = False) -> DocumentMask:
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return DocumentMask(move(self.segments), move(self.positions), move(self.cu_seqlens), self.max_seqlen)

    def pin_memory(self) -> DocumentMask:
        return DocumentMask(self.segments.pin_memory(), self.positions.pin_memory(), self.cu_seqlens.pin_memory(),
                            self.max_seqlen)

    def bool_mask(self) -> torch.Tensor:
        """[B, 1, T, T] mask, True where query t may attend key s: causal and inside the same document."""
        T = self.segments.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=self.segments.device).tril()
        same_doc = self.segments[:, :, None] == self.segments[:, None, :]
        return (same_doc & causal)[:, None]


Mask = Union[None, DocumentMask, torch.Tensor, "BlockMask"]


def prepare_mask(impl: str, mask: Mask, q_len: int, kv_len: int, device, dtype: torch.dtype) -> Mask:
    """The mask `attention(impl=...)` takes, built once per forward pass and shared by every layer.

    `mask` is None (causal), a DocumentMask (causal within documents), or what this function returned before (passed
    through). FlashAttention takes the DocumentMask itself (varlen), flex a BlockMask, SDPA an additive mask in the
    compute dtype (given a bool mask it would convert it in every layer and keep each copy for the backward pass),
    eager a bool mask. A bool or additive [B or 1, 1, T, S] tensor (KV-cache decoding) is for SDPA and eager only.
    """
    if isinstance(mask, torch.Tensor) and impl not in ("sdpa", "eager"):
        raise ValueError(f"attn_impl={impl!r} takes no explicit attention mask; use sdpa or eager")
    if impl == "flex":
        if isinstance(mask, BlockMask):
            return mask
        return _flex_block_mask(mask, q_len, kv_len, torch.device(device))
    if impl in FLASH_BACKENDS or not isinstance(mask, DocumentMask):
        return mask
    allowed = mask.bool_mask()
    if impl == "eager":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


# ------------------------------------------------------------------------------------------------------ dispatch
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str, mask: Mask = None) -> torch.Tensor:
    """Causal attention. q: [B, T, n_head, D]; k, v: [B, S, n_kv, D] with n_head % n_kv == 0. Returns [B, T, n_head, D].

    `impl` is a concrete backend (see `resolve_backend`); `mask` as for `prepare_mask` (passing what it returned
    makes this a pure dispatch). A tensor mask replaces the causal mask (KV-cache decoding).
    """
    mask = prepare_mask(impl, mask, q.shape[1], k.shape[1], q.device, q.dtype)
    if impl in FLASH_BACKENDS:
        return _flash(q, k, v, impl, mask)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # -> [B, H, T, D]
    gqa = kt.shape[1] != qt.shape[1]
    if impl == "flex":
        y = _flex(qt, kt, vt, mask, gqa)
    elif impl == "sdpa":
        T, S = qt.shape[2], kt.shape[2]
        if mask is None and T != S:
            # SDPA's is_causal is top-left aligned; eager and FlashAttention align the last query with the last key.
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
        if mask is not None and mask.is_floating_point():
            mask = mask.to(qt.dtype)
        if mask is not None and gqa:
            # On CUDA only SDPA's flash kernel takes enable_gqa, and it takes no mask: a masked GQA call would fall
            # back to the math kernel (the [B, H, T, T] scores in fp32, ~4 GiB per layer at 1B, micro batch 8).
            # Expanded keys and values keep the memory-efficient kernel (lit_gpt.memory_estimate counts them).
            kt, vt = expand_kv_heads(kt, qt.shape[1]), expand_kv_heads(vt, qt.shape[1])
            gqa = False
        y = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)
    elif impl == "eager":
        y = _eager(qt, kt, vt, mask)
    else:
        raise ValueError(f"attention: impl must be one of {BACKENDS}, got {impl!r} (resolve 'auto' first)")
    return y.transpose(1, 2)


def expand_kv_heads(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """[B, n_kv, S, D] -> [B, n_head, S, D] (a copy): query head i reads key/value head i // (n_head // n_kv)."""
    B, n_kv, S, D = x.shape
    return x[:, :, None].expand(B, n_kv, n_head // n_kv, S, D).reshape(B, n_head, S, D)


def _eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Reference implementation: explicit softmax(QK^T / sqrt(D)) V in fp32 accumulation."""
    k, v = expand_kv_heads(k, q.shape[1]), expand_kv_heads(v, q.shape[1])
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    if mask is None:
        T, S = q.shape[2], k.shape[2]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
    scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


# -------------------------------------------------------------------------------------------------------- flex
def _flex_block_mask(doc_mask: DocumentMask | None, q_len: int, kv_len: int, device: torch.device) -> BlockMask:
    if doc_mask is None:
        return _causal_block_mask(q_len, kv_len, device)
    segments = doc_mask.segments

    def same_document_causal(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (segments[b, q_idx] == segments[b, kv_idx])

    return create_block_mask(same_document_causal, segments.shape[0], None, q_len, kv_len, device=device)


@lru_cache(maxsize=16)
def _causal_block_mask(q_len: int, kv_len: int, device: torch.device) -> BlockMask:
    offset = kv_len - q_len  # the last query sees the last key, as in the other backends

    def causal(b, h, q_idx, kv_idx):
        return q_idx + offset >= kv_idx

    return create_block_mask(causal, None, None, q_len, kv_len, device=device)


@cache
def _compiled_flex():
    # flex_attention is fused only under torch.compile. Wrapped lazily, not at import: torch.compile's first use
    # imports dynamo, seconds that every CPU-only user of this module would pay.
    return torch.compile(flex_attention, dynamic=False)


def _flex(q, k, v, block_mask, gqa: bool) -> torch.Tensor:
    fn = flex_attention
    if q.is_cuda and not torch.compiler.is_compiling():  # inside a compiled Block dynamo fuses it anyway
        fn = _compiled_flex()
    return fn(q, k, v, block_mask=block_mask, enable_gqa=gqa)


# ------------------------------------------------------------------------------------------------ FlashAttention
# For each backend: the module, and the functions called with the keywords they get. The functions are checked, not
# just the module: flash-attn-4 installs `flash_attn/cute` without `flash_attn/__init__.py`, so `import flash_attn`
# succeeds as an empty namespace, and another release may have changed a signature.
_VARLEN_KEYS = ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")
_FA3_UNUSED = dict.fromkeys(("k_new", "v_new", "qv", "out", "cu_seqlens_k_new", "seqused_q", "seqused_k", "page_table",
                             "kv_batch_idx", "leftpad_k", "rotary_cos", "rotary_sin", "seqlens_rotary", "q_descale",
                             "k_descale", "v_descale"))
_FLASH_API = {
    # flash-attention v2.8.3 hopper/: the public functions are autograd.Functions that dynamo cannot trace (CUDA-only
    # op registration, no fake kernel), so the model calls the forward/backward beneath them through its own op.
    "fa3": ("flash_attn_interface", {
        "_flash_attn_forward": (*_FA3_UNUSED, *_VARLEN_KEYS, "softmax_scale", "causal"),
        "_flash_attn_backward": (*_VARLEN_KEYS, "sequed_q", "sequed_k", "dq", "dk", "dv", "softmax_scale", "causal"),
    }),
    # flash-attn-4 4.0.0b36 (CuTe DSL, JIT-compiled): the same, for the same reason.
    "fa4": ("flash_attn.cute.interface", {
        "_flash_attn_fwd": (*_VARLEN_KEYS, "softmax_scale", "causal", "return_lse"),
        "_flash_attn_bwd": (*_VARLEN_KEYS, "softmax_scale", "causal"),
    }),
    # flash-attn 2.8.x registers its kernels as torch custom ops with fake kernels: the public API compiles as is.
    "fa2": ("flash_attn", {
        "flash_attn_func": ("causal",),
        "flash_attn_varlen_func": (*_VARLEN_KEYS, "causal"),
    }),
}
# Backend -> its module, or why it cannot be used. Filled outside compiled regions (by resolve_backend), read inside.
_FLASH: dict[str, ModuleType | str] = {}


def _load_flash(impl: str) -> ModuleType | str:
    module_name, api = _FLASH_API[impl]
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # a broken CUDA extension raises more than ImportError
        return f"the package '{module_name}' is not importable ({type(e).__name__}: {str(e)[:200]})"
    for name, keywords in api.items():
        fn = getattr(module, name, None)
        if not callable(fn):
            return f"'{module_name}' has no function {name} (another package or version?)"
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):  # no Python signature to check
            continue
        missing = [k for k in keywords if k not in params]
        if missing:
            return f"{module_name}.{name} takes no argument(s) {missing} (not the version this toolkit calls)"
    return module


def _flash_entry(impl: str) -> ModuleType | str:
    """The backend's module, or why it cannot be used (loaded once)."""
    if impl not in _FLASH:
        _FLASH[impl] = _load_flash(impl)
    return _FLASH[impl]


def flash_backend_problem(impl: str) -> str | None:
    """Why FlashAttention backend `impl` (fa3, fa4, fa2) cannot be used here, or None: its module, the functions this
    file calls and their keywords (the image's self-check runs the same test)."""
    entry = _flash_entry(impl)
    return entry if isinstance(entry, str) else None


def _flash_module(impl: str) -> ModuleType:
    module = _flash_entry(impl)
    if isinstance(module, str):
        raise AttentionUnavailable(f"attn_impl={impl!r} cannot run: {module}")
    return module


def _flash(q, k, v, impl: str, doc_mask: DocumentMask | None) -> torch.Tensor:
    B, T = q.shape[:2]
    if doc_mask is not None:  # varlen: the documents of all rows back to back, [B*T, heads, D]
        q, k, v = (x.reshape(B * T, *x.shape[2:]) for x in (q, k, v))
        cu_seqlens, max_seqlen = doc_mask.cu_seqlens, doc_mask.max_seqlen
    else:
        cu_seqlens, max_seqlen = None, T
    if impl == "fa2":
        fa2 = _flash_module("fa2")
        if cu_seqlens is None:
            out = fa2.flash_attn_func(q, k, v, causal=True)
        else:
            out = fa2.flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
                                             max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen, causal=True)
    else:
        out, _ = flash_attn_op(q, k, v, cu_seqlens, max_seqlen, impl)
    return out.reshape(B, T, *out.shape[-2:])


def _varlen_args(cu_seqlens: torch.Tensor | None, max_seqlen: int) -> dict:
    n = None if cu_seqlens is None else max_seqlen
    return dict(cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=n, max_seqlen_k=n)


def _fa3_forward(q, k, v, cu_seqlens, max_seqlen, scale):
    out, lse, *_ = _flash_module("fa3")._flash_attn_forward(
        q, k, v, **_FA3_UNUSED, **_varlen_args(cu_seqlens, max_seqlen), softmax_scale=scale, causal=True)
    return out, lse


def _fa3_backward(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, scale):
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    _flash_module("fa3")._flash_attn_backward(
        dout, q, k, v, out, lse, **_varlen_args(cu_seqlens, max_seqlen), sequed_q=None, sequed_k=None,
        dq=dq, dk=dk, dv=dv, softmax_scale=scale, causal=True)
    return dq, dk, dv


def _fa4_forward(q, k, v, cu_seqlens, max_seqlen, scale):
    out, lse, *_ = _flash_module("fa4")._flash_attn_fwd(
        q, k, v, **_varlen_args(cu_seqlens, max_seqlen), softmax_scale=scale, causal=True, return_lse=True)
    return out, lse


def _fa4_backward(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, scale):
    dq, dk, dv, *_ = _flash_module("fa4")._flash_attn_bwd(
        q, k, v, out, dout, lse, **_varlen_args(cu_seqlens, max_seqlen), softmax_scale=scale, causal=True)
    return dq, dk, dv


_FLASH_KERNELS = {"fa3": (_fa3_forward, _fa3_backward), "fa4": (_fa4_forward, _fa4_backward)}


# One op pair for FA3 and FA4: opaque to dynamo (no graph break), with fake kernels that give AOTAutograd and inductor
# the output shapes. Causal, default softmax scale; `cu_seqlens`/`max_seqlen` select varlen ([total, heads, D] inputs).
@library.custom_op("lit_gpt::flash_attn", mutates_args=())
def flash_attn_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None,
                  max_seqlen: int, kernel: str) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = _FLASH_KERNELS[kernel][0](q, k, v, cu_seqlens, max_seqlen, q.shape[-1] ** -0.5)
    return out.contiguous(), lse.contiguous()  # the layout the fake kernel promises


@flash_attn_op.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, kernel):
    # softmax_lse is fp32 [heads, total] (varlen) or [B, heads, T], in FA3 v2.8.3 and FA4 alike
    lse_shape = (q.shape[1], q.shape[0]) if cu_seqlens is not None else (q.shape[0], q.shape[2], q.shape[1])
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32)


@library.custom_op("lit_gpt::flash_attn_backward", mutates_args=())
def flash_attn_backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                           lse: torch.Tensor, cu_seqlens: torch.Tensor | None, max_seqlen: int,
                           kernel: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = _FLASH_KERNELS[kernel][1](dout, q, k, v, out, lse, cu_seqlens, max_seqlen, q.shape[-1] ** -0.5)
    return tuple(g.contiguous() for g in grads)


@flash_attn_backward_op.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, kernel):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _flash_setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, kernel = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_seqlens)
    ctx.max_seqlen, ctx.kernel = max_seqlen, kernel


def _flash_backward(ctx, dout, _dlse):  # lse is an internal by-product: nothing differentiates it
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = flash_attn_backward_op(dout.contiguous(), q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, ctx.kernel)
    return dq, dk, dv, None, None, None


flash_attn_op.register_autograd(_flash_backward, setup_context=_flash_setup_context)


# ---------------------------------------------------------------------------------------------------- resolution
def _unavailable_reason(impl: str, device: torch.device, dtype: torch.dtype, head_size: int,
                        needs_grad: bool) -> str | None:
    """Why backend `impl` cannot run attention with these inputs, or None if it can."""
    if impl in ("sdpa", "eager"):
        return None
    if impl == "flex":
        if flex_attention is None:
            return "this PyTorch has no torch.nn.attention.flex_attention"
        if device.type == "cpu":
            # PyTorch raises NotImplementedError for any flex_attention input that requires grad on CPU
            return "PyTorch's flex_attention has no backward pass on CPU (inference only)" if needs_grad else None
        if device.type != "cuda":
            return f"flex_attention does not run on {device.type}"
        return f"head size {head_size} < 16 (flex_attention's CUDA kernels)" if head_size < 16 else None
    if isinstance(entry := _flash_entry(impl), str):
        return entry
    if device.type != "cuda":
        return f"inputs are on {device.type}, not CUDA"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {dtype} is not fp16/bf16"
    major = torch.cuda.get_device_capability(device)[0]
    head_ok = head_size % 8 == 0
    if impl == "fa3":
        if major != 9:
            return f"FlashAttention-3 needs a Hopper GPU (compute capability 9.x), this one is {major}.x"
        if dtype != torch.bfloat16:
            return f"dtype {dtype}: the image builds FlashAttention-3 for bf16 only (llammlein.def)"
        head_ok &= head_size <= 128  # the image's build: head dims up to 128
    elif impl == "fa4":
        if major not in (9, 10):
            return f"FlashAttention-4 runs forward and backward on compute capability 9.x/10.x, this one is {major}.x"
        head_ok &= 8 <= head_size <= (256 if major == 9 else 128)
    else:
        if major < 8:
            return f"FlashAttention-2 needs compute capability >= 8.0, this one is {major}.x"
        head_ok &= head_size <= 256
    return None if head_ok else f"head size {head_size} is not supported by {impl} on compute capability {major}.x"


def resolve_backend(impl: str, device, dtype: torch.dtype, head_size: int, document_masking: bool = False,
                    needs_grad: bool | None = None) -> str:
    """Turn `auto` (or the environment's choice) into a concrete backend that can run these inputs.

    auto: on CUDA the first of fa3, fa4, fa2, then flex (document masking) or sdpa (none) that can run; on CPU sdpa
    (fast and exact there). An explicit backend that cannot run raises AttentionUnavailable with the reason.
    `needs_grad` (default: autograd is enabled) matters for flex on CPU, which has no backward pass.
    """
    if impl == "auto":
        impl = os.environ.get(ENV_VAR, "auto")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    needs_grad = torch.is_grad_enabled() if needs_grad is None else needs_grad
    if impl == "auto":
        if device.type != "cuda":
            return "sdpa"
        for candidate in (*FLASH_BACKENDS, "flex" if document_masking else "sdpa"):
            if _unavailable_reason(candidate, device, dtype, head_size, needs_grad) is None:
                return candidate
        return "sdpa"
    if impl not in BACKENDS:
        raise ValueError(f"Unknown attn_impl {impl!r} (set via config or ${ENV_VAR}); use auto or one of "
                         f"{', '.join(BACKENDS)}")
    reason = _unavailable_reason(impl, device, dtype, head_size, needs_grad)
    if reason is not None:
        raise AttentionUnavailable(f"attn_impl={impl!r} was requested but cannot run: {reason}")
    return impl


def resolve_impl(impl: str, q: torch.Tensor, document_masking: bool = False) -> str:
    """`resolve_backend` for inputs like q ([..., head_size])."""
    return resolve_backend(impl, q.device, q.dtype, q.shape[-1], document_masking)
