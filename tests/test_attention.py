"""Attention backends, document masks and backend resolution, checked against a loop-based reference.

FlashAttention kernels cannot run on CPU: their call paths are checked with stand-in modules that have the real
signatures (flash-attention v2.8.3 `flash_attn_interface` and `flash_attn`, flash-attn-4 4.0.0b36
`flash_attn.cute.interface`) and compute exact attention on CPU.
"""
import math
import sys
import types

import numpy as np
import pytest
import torch
from torch import library

import lit_gpt.attention as attn_mod
from lit_gpt.attention import (
    BACKENDS,
    ENV_VAR,
    AttentionUnavailable,
    DocumentMask,
    attention,
    prepare_mask,
    resolve_backend,
    resolve_impl,
)
from lit_gpt.config import ATTN_IMPLS

# (n_head, n_kv): MHA, GQA, MQA
HEAD_LAYOUTS = [(4, 4), (4, 2), (4, 1)]
EXACT = ["sdpa", "eager", "flex"]  # backends that run on CPU (flex: forward only there)


def reference_attention(q, k, v, allowed):
    """Plain per-(batch, head, query) softmax. allowed(b, t, s) -> bool. q: [B,T,H,D]; k, v: [B,S,KV,D]."""
    B, T, H, D = q.shape
    S, KV = k.shape[1], k.shape[2]
    group = H // KV
    out = torch.zeros(B, T, H, D, dtype=torch.float64)
    q, k, v = q.double(), k.double(), v.double()
    for b in range(B):
        for h in range(H):
            kv = h // group  # query head h reads key/value head h // group
            for t in range(T):
                keys = [s for s in range(S) if allowed(b, t, s)]
                scores = torch.stack([q[b, t, h] @ k[b, s, kv] for s in keys]) / math.sqrt(D)
                weights = torch.softmax(scores, dim=0)
                out[b, t, h] = sum(w * v[b, s, kv] for w, s in zip(weights, keys))
    return out.float()


def doc_segments(doc_ids_row):
    """Document number of each position: a new document starts wherever the id changes."""
    seg, out = 0, []
    for t, d in enumerate(doc_ids_row):
        if t > 0 and d != doc_ids_row[t - 1]:
            seg += 1
        out.append(seg)
    return out


def qkv(B, T, H, KV, D=8, S=None, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    S = T if S is None else S
    tensors = (torch.randn(B, T, H, D, generator=g), torch.randn(B, S, KV, D, generator=g),
               torch.randn(B, S, KV, D, generator=g))
    return tuple(t.requires_grad_(requires_grad) for t in tensors)


def random_doc_ids(B, T, seed, p=0.15):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(B, T, generator=g) < p).long().cumsum(dim=1)


@pytest.fixture(autouse=True)
def _no_env_override(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


# ------------------------------------------------------------------------------------------ CPU backends vs reference


@pytest.mark.parametrize("H,KV", HEAD_LAYOUTS)
@pytest.mark.parametrize("impl", EXACT)
@torch.no_grad()
def test_causal_matches_reference(impl, H, KV):
    q, k, v = qkv(2, 7, H, KV)
    ref = reference_attention(q, k, v, lambda b, t, s: s <= t)
    out = attention(q, k, v, impl)
    assert out.shape == q.shape
    assert (out - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("H,KV", HEAD_LAYOUTS)
@pytest.mark.parametrize("impl", EXACT)
@torch.no_grad()
def test_document_mask_matches_reference(impl, H, KV):
    # Row 1 reuses id 0 for a later, different document: ids only mark where documents change.
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2], [0, 0, 3, 3, 3, 0, 0, 0]])
    segs = [doc_segments(row.tolist()) for row in doc_ids]
    q, k, v = qkv(2, 8, H, KV, seed=1)
    ref = reference_attention(q, k, v, lambda b, t, s: s <= t and segs[b][s] == segs[b][t])
    out = attention(q, k, v, impl, DocumentMask.from_doc_ids(doc_ids))
    assert (out - ref).abs().max() <= 1e-5
    # sanity: the mask matters, plain causal attention gives something else
    assert (attention(q, k, v, impl) - ref).abs().max() > 1e-2


@pytest.mark.parametrize("impl,H,KV", [("sdpa", H, KV) for H, KV in HEAD_LAYOUTS] + [("flex", 4, 2)])
@pytest.mark.parametrize("with_docs", [False, True])
@torch.no_grad()
def test_backends_agree_with_eager_fp32(impl, H, KV, with_docs):
    # Longer than flex's 128-token blocks, with documents crossing block borders.
    B, T = 3, 300
    q, k, v = qkv(B, T, H, KV, D=16, seed=2)
    doc_mask = DocumentMask.from_doc_ids(random_doc_ids(B, T, seed=3, p=0.01)) if with_docs else None
    a = attention(q, k, v, impl, doc_mask)
    b = attention(q, k, v, "eager", doc_mask)
    assert (a - b).abs().max() <= 1e-5


@pytest.mark.parametrize("impl", EXACT)
@torch.no_grad()
def test_fewer_queries_than_keys_is_bottom_right_causal(impl):
    # The last T queries of an S-long sequence (what FlashAttention and incremental decoding assume).
    T, S = 3, 6
    q, k, v = qkv(1, T, 4, 2, S=S, seed=4)
    ref = reference_attention(q, k, v, lambda b, t, s: s <= t + (S - T))
    assert (attention(q, k, v, impl) - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_explicit_attn_mask_replaces_causal(impl):
    T, S = 2, 5
    q, k, v = qkv(1, T, 2, 2, S=S, seed=5)
    mask = torch.tensor([[True, False, True, False, False], [True, True, True, True, False]])
    ref = reference_attention(q, k, v, lambda b, t, s: bool(mask[t, s]))
    out = attention(q, k, v, impl, mask[None, None])
    assert (out - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("impl", ["flex", "fa2"])
def test_explicit_mask_is_refused_by_kernels_without_one(impl):
    q, k, v = qkv(1, 2, 2, 2, S=4)
    with pytest.raises(ValueError, match="no explicit attention mask"):
        attention(q, k, v, impl, torch.ones(1, 1, 2, 4, dtype=torch.bool))


def test_flex_gradients_on_cpu_are_refused_clearly():
    # PyTorch's flex_attention has no backward pass on CPU: resolving it for training says so instead of failing
    # in the middle of a step (its gradients are checked against eager on GPU, tests/gpu/test_attention_gpu.py).
    with pytest.raises(AttentionUnavailable, match="no backward pass on CPU"):
        resolve_backend("flex", "cpu", torch.float32, 16, needs_grad=True)
    assert resolve_backend("flex", "cpu", torch.float32, 16, needs_grad=False) == "flex"
    with torch.no_grad():
        assert resolve_backend("flex", "cpu", torch.float32, 16) == "flex"


# ----------------------------------------------------------------------------------------------- masks, prepared once


@pytest.mark.parametrize("impl", ["sdpa", "eager", "flex"])
@torch.no_grad()
def test_prepared_mask_gives_the_same_result(impl):
    B, T = 2, 40
    q, k, v = qkv(B, T, 4, 2, D=16, seed=6)
    doc_mask = DocumentMask.from_doc_ids(random_doc_ids(B, T, seed=7))
    prepared = prepare_mask(impl, doc_mask, T, T, q.device, q.dtype)
    assert prepare_mask(impl, prepared, T, T, q.device, q.dtype) is prepared  # a prepared mask passes through
    assert torch.equal(attention(q, k, v, impl, prepared), attention(q, k, v, impl, doc_mask))


def test_sdpa_mask_is_additive_in_the_compute_dtype():
    doc_mask = DocumentMask.from_doc_ids(torch.tensor([[0, 0, 1, 1]]))
    mask = prepare_mask("sdpa", doc_mask, 4, 4, "cpu", torch.bfloat16)
    assert mask.dtype == torch.bfloat16 and mask.shape == (1, 1, 4, 4)
    allowed = doc_mask.bool_mask()
    assert (mask[allowed] == 0).all() and torch.isneginf(mask[~allowed]).all()
    assert prepare_mask("eager", doc_mask, 4, 4, "cpu", torch.float32).dtype == torch.bool
    for impl in ("fa3", "fa4", "fa2"):  # the varlen kernels take the metadata itself
        assert prepare_mask(impl, doc_mask, 4, 4, "cpu", torch.bfloat16) is doc_mask


# ------------------------------------------------------------------------------------------------- document metadata


def on_device_metadata(doc_ids: torch.Tensor):
    """The previous implementation, which ran on the GPU each forward pass (nonzero() and int() synchronise)."""
    B, T = doc_ids.shape
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    index = torch.arange(T, device=doc_ids.device).expand(B, T)
    start_of_doc = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    positions = index - start_of_doc
    flat_starts = starts.reshape(-1).nonzero().squeeze(1)
    cu_seqlens = torch.cat([flat_starts, torch.tensor([B * T], device=doc_ids.device)]).to(torch.int32)
    max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    segment = (positions == 0).cumsum(dim=1)
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    bool_mask = ((segment[:, :, None] == segment[:, None, :]) & causal)[:, None]
    return positions, cu_seqlens, max_seqlen, bool_mask


@pytest.mark.parametrize("seed", range(4))
def test_host_metadata_equals_the_old_on_device_computation(seed):
    g = torch.Generator().manual_seed(seed)
    B, T = 3, 64
    # Arbitrary ids, including a recurring one and a row that is one single document.
    doc_ids = torch.randint(0, 3, (B, T), generator=g)
    doc_ids[1] = 7
    positions, cu_seqlens, max_seqlen, bool_mask = on_device_metadata(doc_ids)
    for given in (doc_ids, doc_ids.numpy()):  # a tensor (model callers) or the loader's numpy array
        m = DocumentMask.from_doc_ids(given)
        assert torch.equal(m.positions, positions)
        assert torch.equal(m.cu_seqlens, cu_seqlens) and m.cu_seqlens.dtype == torch.int32
        assert m.max_seqlen == max_seqlen and isinstance(m.max_seqlen, int)
        assert torch.equal(m.bool_mask(), bool_mask)


def test_document_mask_hand_example():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1], [1, 4, 4, 4, 9]])
    m = DocumentMask.from_doc_ids(doc_ids)
    assert m.positions.tolist() == [[0, 1, 2, 0, 1], [0, 0, 1, 2, 0]]
    assert m.segments.tolist() == [[0, 0, 0, 1, 1], [0, 1, 1, 1, 2]]
    # Row 1 starts a new document even though its first id equals row 0's last id.
    assert m.cu_seqlens.tolist() == [0, 3, 5, 6, 9, 10]
    assert m.cu_seqlens.dtype == torch.int32
    assert m.max_seqlen == 3
    expected_row0 = [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [0, 0, 0, 1, 0],
        [0, 0, 0, 1, 1],
    ]
    expected_row1 = [
        [1, 0, 0, 0, 0],
        [0, 1, 0, 0, 0],
        [0, 1, 1, 0, 0],
        [0, 1, 1, 1, 0],
        [0, 0, 0, 0, 1],
    ]
    mask = m.bool_mask()
    assert mask.shape == (2, 1, 5, 5) and mask.dtype == torch.bool
    assert mask[0, 0].int().tolist() == expected_row0
    assert mask[1, 0].int().tolist() == expected_row1


def test_document_mask_recurring_id_is_a_new_document():
    m = DocumentMask.from_doc_ids(torch.tensor([[0, 0, 1, 1, 0, 0]]))
    assert m.positions.tolist() == [[0, 1, 0, 1, 0, 1]]
    assert m.cu_seqlens.tolist() == [0, 2, 4, 6]
    mask = m.bool_mask()[0, 0]
    # The third document (id 0 again) must not see the first one.
    assert not mask[4:, :2].any()
    assert mask[5, 4] and mask[5, 5]


def test_single_document_mask_is_causal():
    m = DocumentMask.from_doc_ids(torch.zeros(2, 6, dtype=torch.long))
    assert m.positions.tolist() == [list(range(6))] * 2
    assert m.cu_seqlens.tolist() == [0, 6, 12]
    assert m.max_seqlen == 6
    assert torch.equal(m.bool_mask()[:, 0], torch.ones(6, 6, dtype=torch.bool).tril().expand(2, 6, 6))


def test_document_mask_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        DocumentMask.from_doc_ids(np.zeros(5, dtype=np.int64))


def test_loader_batches_carry_the_host_built_mask(prepared_data):
    from lit_gpt.packed_dataset import PackedDataset

    ds = PackedDataset([prepared_data["train"]], block_size=127, with_doc_ids=True)
    batch = ds.get_batch(np.arange(6))
    m = batch["doc_mask"]
    positions, cu_seqlens, max_seqlen, bool_mask = on_device_metadata(batch["doc_ids"])
    assert torch.equal(m.positions, positions) and torch.equal(m.cu_seqlens, cu_seqlens)
    assert m.max_seqlen == max_seqlen and torch.equal(m.bool_mask(), bool_mask)
    assert len(cu_seqlens) > 7  # several documents in these rows: the comparison means something


# ------------------------------------------------------------------------------------------------------- resolution


def test_attn_impls_of_config_are_the_backends():
    assert ATTN_IMPLS == ("auto", *BACKENDS)


def test_auto_resolves_to_sdpa_on_cpu():
    q = torch.randn(1, 4, 2, 8)
    assert resolve_impl("auto", q) == "sdpa"
    assert resolve_impl("auto", q, document_masking=True) == "sdpa"
    assert resolve_impl("eager", q) == "eager"
    assert resolve_impl("sdpa", q) == "sdpa"


@pytest.mark.parametrize("impl", ["fa2", "fa3", "fa4"])
def test_unavailable_flash_backend_raises(impl, monkeypatch):
    monkeypatch.setattr(attn_mod, "_FLASH", {})
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(AttentionUnavailable, match=f"attn_impl='{impl}'.*cannot run"):
        resolve_impl(impl, q)
    assert issubclass(AttentionUnavailable, ValueError)  # the trainer reports it as a flag error


def test_env_var_steers_auto(monkeypatch):
    q = torch.randn(1, 5, 2, 8)
    monkeypatch.setenv(ENV_VAR, "eager")
    assert resolve_impl("auto", q) == "eager"
    # an explicit choice is not overridden by the environment
    assert resolve_impl("sdpa", q) == "sdpa"
    monkeypatch.setenv(ENV_VAR, "fa2")
    with pytest.raises(AttentionUnavailable):
        resolve_impl("auto", q)
    monkeypatch.setenv(ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="bogus"):
        resolve_impl("auto", q)


# ----------------------------------------------------------------- FlashAttention stand-ins (real signatures, CPU math)


def _flat(q, cu_seqlens):
    """[B, T, H, D] or varlen [N, H, D] -> ([N, H, D], cu_seqlens over the N tokens)."""
    if cu_seqlens is None:
        B, T = q.shape[:2]
        return q.reshape(B * T, *q.shape[2:]), torch.arange(0, B * T + 1, T, dtype=torch.int32)
    return q, cu_seqlens


def _scores(q, k, cu, scale):
    N, H = q.shape[:2]
    seg = torch.repeat_interleave(torch.arange(len(cu) - 1), (cu[1:] - cu[:-1]).long())
    pos = torch.arange(N)
    allowed = (seg[:, None] == seg[None, :]) & (pos[:, None] >= pos[None, :])
    kk = k.repeat_interleave(H // k.shape[1], dim=1)
    return torch.einsum("nhd,mhd->hnm", q, kk).mul(scale).masked_fill(~allowed, float("-inf")), kk


def standin_forward(q, k, v, cu_seqlens, scale):
    """Exact causal (varlen) attention with FlashAttention's outputs: out like q, lse [H, N] or [B, H, T]."""
    (qf, cu), (kf, _), (vf, _) = (_flat(x, cu_seqlens) for x in (q, k, v))
    s, _ = _scores(qf, kf, cu, scale)
    lse = s.logsumexp(-1)
    out = torch.einsum("hnm,mhd->nhd", (s - lse[..., None]).exp(), vf.repeat_interleave(s.shape[0] // vf.shape[1], 1))
    if cu_seqlens is None:
        B, T = q.shape[:2]
        return out.reshape(q.shape), lse.reshape(-1, B, T).transpose(0, 1)
    return out, lse


def standin_backward(dout, q, k, v, out, lse, cu_seqlens, scale):
    """Gradients of standin_forward, by hand (autograd does not run inside a custom op's kernel)."""
    (qf, cu), (kf, _), (vf, _), (dof, _), (of, _) = (_flat(x, cu_seqlens) for x in (q, k, v, dout, out))
    H, KV = qf.shape[1], kf.shape[1]
    s, kk = _scores(qf, kf, cu, scale)
    lse = lse.transpose(0, 1).reshape(H, -1) if cu_seqlens is None else lse
    p = (s - lse[..., None]).exp()
    vv = vf.repeat_interleave(H // KV, dim=1)
    dp = torch.einsum("nhd,mhd->hnm", dof, vv)
    ds = p * (dp - (dof * of).sum(-1).T[..., None])
    dq = torch.einsum("hnm,mhd->nhd", ds, kk) * scale
    group_sum = lambda g: g.reshape(g.shape[0], KV, H // KV, -1).sum(2)  # noqa: E731 (query heads -> their kv head)
    dk = group_sum(torch.einsum("hnm,nhd->mhd", ds, qf) * scale)
    dv = group_sum(torch.einsum("hnm,nhd->mhd", p, dof))
    return dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape)


def check_call(calls, cu_q, cu_k, max_q, max_k, causal, q):
    """The arguments every kernel must get: causal, int32 cu_seqlens and an int max_seqlen for [N, H, D] inputs."""
    assert causal is True
    assert (cu_q is None) == (cu_k is None) == (max_q is None) == (max_k is None)
    if cu_q is None:
        assert q.dim() == 4
    else:
        assert q.dim() == 3 and cu_q.dtype == torch.int32 and cu_q is cu_k
        assert isinstance(max_q, int) and max_q == max_k == int((cu_q[1:] - cu_q[:-1]).max())
    calls.append("varlen" if cu_q is not None else "dense")


def fa3_module(calls):
    """flash-attention v2.8.3 hopper/flash_attn_interface.py: the two functions beneath its autograd.Functions."""
    def _flash_attn_forward(q, k, v, k_new, v_new, qv, out, cu_seqlens_q, cu_seqlens_k, cu_seqlens_k_new, seqused_q,
                            seqused_k, max_seqlen_q, max_seqlen_k, page_table, kv_batch_idx, leftpad_k, rotary_cos,
                            rotary_sin, seqlens_rotary, q_descale, k_descale, v_descale, softmax_scale, causal,
                            window_size=(-1, -1), attention_chunk=0, softcap=0.0, rotary_interleaved=True,
                            scheduler_metadata=None, num_splits=1, pack_gqa=None, sm_margin=0):
        check_call(calls, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, q)
        assert all(x is None for x in (k_new, v_new, qv, out, cu_seqlens_k_new, seqused_q, seqused_k, page_table))
        out, lse = standin_forward(q, k, v, cu_seqlens_q, softmax_scale)
        return out, lse, None, None

    def _flash_attn_backward(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, sequed_q, sequed_k,
                             max_seqlen_q, max_seqlen_k, dq, dk, dv, softmax_scale, causal, window_size=(-1, -1),
                             softcap=0.0, deterministic=False, sm_margin=0):
        check_call(calls, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, q)
        for buffer, grad in zip((dq, dk, dv), standin_backward(dout, q, k, v, out, softmax_lse, cu_seqlens_q,
                                                                softmax_scale)):
            buffer.copy_(grad)  # v2.8.3 writes into the buffers it is given
        return dq, dk, dv, None

    return _module("flash_attn_interface", _flash_attn_forward=_flash_attn_forward,
                   _flash_attn_backward=_flash_attn_backward)


def fa4_modules(calls):
    """flash-attn-4 4.0.0b36: flash_attn/cute/interface.py, and `flash_attn` as the empty namespace it leaves."""
    def _flash_attn_fwd(q, k, v, qv=None, cu_seqlens_q=None, cu_seqlens_k=None, seqused_q=None, seqused_k=None,
                        max_seqlen_q=None, max_seqlen_k=None, min_seqlen_k=None, page_table=None, softmax_scale=None,
                        causal=False, softcap=None, window_size_left=None, window_size_right=None, *,
                        return_lse=False, **more):
        check_call(calls, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, q)
        assert qv is None and return_lse
        return (*standin_forward(q, k, v, cu_seqlens_q, softmax_scale), None, None, None)

    def _flash_attn_bwd(q, k, v, out, dout, lse, softmax_scale=None, causal=False, softcap=0.0, window_size_left=None,
                        window_size_right=None, m_block_size=64, n_block_size=128, num_threads=256, pack_gqa=False,
                        num_stages_Q=2, num_stages_dO=2, SdP_swapAB=False, dKV_swapAB=False, dQ_swapAB=False,
                        AtomLayoutMSdP=2, AtomLayoutNdKV=2, AtomLayoutMdQ=2, V_in_regs=False, cu_seqlens_q=None,
                        cu_seqlens_k=None, seqused_q=None, seqused_k=None, max_seqlen_q=None, max_seqlen_k=None,
                        deterministic=False, dq=None, dk=None, dv=None, **more):
        check_call(calls, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, q)
        return standin_backward(dout, q, k, v, out, lse, cu_seqlens_q, softmax_scale)

    interface = _module("flash_attn.cute.interface", _flash_attn_fwd=_flash_attn_fwd, _flash_attn_bwd=_flash_attn_bwd)
    return {"flash_attn": _module("flash_attn"), "flash_attn.cute": _module("flash_attn.cute", interface=interface),
            "flash_attn.cute.interface": interface}


def fa2_module(calls):
    """flash-attn 2.8.3 `flash_attn`: its public functions (autograd-aware; here plain torch ops)."""
    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                        alibi_slopes=None, deterministic=False, return_attn_probs=False):
        check_call(calls, None, None, None, None, causal, q)
        return standin_forward(q, k, v, None, q.shape[-1] ** -0.5)[0]

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                               deterministic=False, return_attn_probs=False, block_table=None):
        check_call(calls, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, q)
        return standin_forward(q, k, v, cu_seqlens_q, q.shape[-1] ** -0.5)[0]

    return _module("flash_attn", flash_attn_func=flash_attn_func, flash_attn_varlen_func=flash_attn_varlen_func)


def _module(name, **attributes):
    module = types.ModuleType(name)
    for key, value in attributes.items():
        setattr(module, key, value)
    return module


@pytest.fixture
def flash_standins(monkeypatch):
    """Installs stand-ins: install(fa3=..., fa4=..., fa2=...) with True/False per backend; returns the call log."""
    calls = []
    monkeypatch.setattr(attn_mod, "_FLASH", {})

    def install(fa3=False, fa4=False, fa2=False):
        # None in sys.modules: "not importable", whatever this machine has installed
        modules = dict.fromkeys(("flash_attn_interface", "flash_attn", "flash_attn.cute", "flash_attn.cute.interface"))
        if fa4:
            modules.update(fa4_modules(calls))
        if fa2:  # installed beside flash-attn-4, flash-attn 2's package fills the `flash_attn` namespace
            modules["flash_attn"] = fa2_module(calls)
        if fa3:
            modules["flash_attn_interface"] = fa3_module(calls)
        for name, module in modules.items():
            monkeypatch.setitem(sys.modules, name, module)
        attn_mod._FLASH.clear()
        return calls

    return install


@pytest.mark.parametrize("impl", ["fa3", "fa4", "fa2"])
@pytest.mark.parametrize("with_docs", [False, True])
@pytest.mark.parametrize("H,KV", [(4, 2), (2, 2)])
def test_flash_call_paths_match_sdpa(flash_standins, impl, with_docs, H, KV):
    calls = flash_standins(**{impl: True})
    B, T = 2, 12
    doc_mask = DocumentMask.from_doc_ids(random_doc_ids(B, T, seed=8, p=0.3)) if with_docs else None
    inputs = qkv(B, T, H, KV, seed=9, requires_grad=True)
    ref_inputs = [x.detach().clone().requires_grad_() for x in inputs]
    out = attention(*inputs, impl, doc_mask)
    ref = attention(*ref_inputs, "sdpa", doc_mask)
    assert out.shape == ref.shape and (out - ref).abs().max() <= 1e-5
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    for x, r in zip(inputs, ref_inputs):
        assert (x.grad - r.grad).abs().max() <= 1e-5
    expected = "varlen" if with_docs else "dense"
    assert calls == [expected] * (1 if impl == "fa2" else 2)  # fa3/fa4: our op's forward and backward kernels


@pytest.mark.parametrize("impl", ["fa3", "fa4"])
@pytest.mark.parametrize("with_docs", [False, True])
def test_flash_op_compiles_without_graph_breaks(flash_standins, impl, with_docs):
    # The custom op is opaque to dynamo and its fake kernel gives AOTAutograd the shapes: compiled forward and
    # backward equal the same stand-in run eagerly.
    flash_standins(**{impl: True})
    B, T = 2, 16
    doc_mask = DocumentMask.from_doc_ids(random_doc_ids(B, T, seed=10, p=0.2)) if with_docs else None

    def run(fn):
        inputs = qkv(B, T, 4, 2, seed=11, requires_grad=True)
        out = fn(*inputs)
        out.pow(2).sum().backward()
        return out.detach(), [x.grad for x in inputs]

    def f(q, k, v):
        return attention(q, k, v, impl, doc_mask) * 2

    eager_out, eager_grads = run(f)
    torch._dynamo.reset()
    compiled_out, compiled_grads = run(torch.compile(f, fullgraph=True, backend="aot_eager"))
    assert torch.allclose(compiled_out, eager_out, atol=1e-6)
    for a, b in zip(compiled_grads, eager_grads):
        assert torch.allclose(a, b, atol=1e-5)


def test_flash_op_registration_is_consistent(flash_standins):
    # torch's own check of a custom op: schema, fake kernel vs the real one, autograd registration.
    flash_standins(fa3=True)
    q, k, v = qkv(1, 8, 4, 2, requires_grad=True)
    library.opcheck(attn_mod.flash_attn_op, (q, k, v, None, 8, "fa3"),
                    test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    doc_mask = DocumentMask.from_doc_ids(torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]]))
    flat = [x.reshape(8, *x.shape[2:]) for x in (q, k, v)]
    library.opcheck(attn_mod.flash_attn_op, (*flat, doc_mask.cu_seqlens, doc_mask.max_seqlen, "fa3"),
                    test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


# Resolution on a (pretended) GPU: which backend `auto` takes, with which packages installed.
def resolve_on(monkeypatch, capability, head_size=64, dtype=torch.bfloat16, masking=False, impl="auto"):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    return resolve_backend(impl, "cuda:0", dtype, head_size, document_masking=masking, needs_grad=True)


def test_auto_on_hopper_prefers_fa3_then_fa4_then_fa2(flash_standins, monkeypatch):
    flash_standins(fa3=True, fa4=True, fa2=True)
    assert resolve_on(monkeypatch, (9, 0)) == "fa3"
    assert resolve_on(monkeypatch, (9, 0), head_size=256) == "fa4"  # beyond the FA3 build's 128
    assert resolve_on(monkeypatch, (9, 0), head_size=72) == "fa3"  # any multiple of 8 up to 128
    assert resolve_on(monkeypatch, (9, 0), head_size=60, masking=True) == "flex"  # no FlashAttention takes 60
    assert resolve_on(monkeypatch, (9, 0), head_size=60) == "sdpa"
    assert resolve_on(monkeypatch, (9, 0), dtype=torch.float32) == "sdpa"  # FlashAttention is fp16/bf16 only
    flash_standins(fa4=True, fa2=True)
    assert resolve_on(monkeypatch, (9, 0)) == "fa4"
    flash_standins(fa2=True)
    assert resolve_on(monkeypatch, (9, 0)) == "fa2"


def test_auto_on_other_gpus_takes_the_first_that_runs(flash_standins, monkeypatch):
    flash_standins(fa3=True, fa4=True, fa2=True)
    assert resolve_on(monkeypatch, (8, 0)) == "fa2"  # Ampere: no FA3, no FA4 backward
    assert resolve_on(monkeypatch, (10, 0)) == "fa4"  # Blackwell
    assert resolve_on(monkeypatch, (10, 0), head_size=192) == "fa2"  # FA4 on sm100: up to 128
    assert resolve_on(monkeypatch, (7, 5), masking=True) == "flex"
    assert resolve_on(monkeypatch, (7, 5)) == "sdpa"


def test_flash_attn_4_alone_is_not_taken_for_flash_attn_2(flash_standins, monkeypatch):
    # flash-attn-4 leaves `flash_attn` an importable but empty namespace: FA2 must not be chosen on Ampere.
    flash_standins(fa4=True)
    assert resolve_on(monkeypatch, (8, 0), masking=True) == "flex"
    assert resolve_on(monkeypatch, (9, 0)) == "fa4"
    with pytest.raises(AttentionUnavailable, match="flash_attn' has no function flash_attn_func"):
        resolve_on(monkeypatch, (8, 0), impl="fa2")


def test_explicit_backend_that_cannot_run_names_the_reason(flash_standins, monkeypatch):
    flash_standins(fa3=True, fa4=True, fa2=True)
    with pytest.raises(AttentionUnavailable, match=r"attn_impl='fa3'.*Hopper.*8\.x"):
        resolve_on(monkeypatch, (8, 0), impl="fa3")
    with pytest.raises(AttentionUnavailable, match=r"attn_impl='fa3'.*head size 256"):
        resolve_on(monkeypatch, (9, 0), head_size=256, impl="fa3")
    with pytest.raises(AttentionUnavailable, match=r"attn_impl='fa4'.*8\.x"):
        resolve_on(monkeypatch, (8, 6), impl="fa4")
    with pytest.raises(AttentionUnavailable, match=r"attn_impl='fa2'.*float32"):
        resolve_on(monkeypatch, (8, 0), dtype=torch.float32, impl="fa2")
    with pytest.raises(AttentionUnavailable, match=r"attn_impl='flex'.*head size 8"):
        resolve_on(monkeypatch, (9, 0), head_size=8, impl="flex")
    assert resolve_on(monkeypatch, (9, 0), impl="fa2") == "fa2"  # explicit: taken even where fa3 would be faster


def test_flash_package_of_another_version_is_not_used(flash_standins, monkeypatch):
    flash_standins(fa3=True)
    renamed = _module("flash_attn_interface", _flash_attn_forward=lambda q, k, v, out_=None: None,
                      _flash_attn_backward=sys.modules["flash_attn_interface"]._flash_attn_backward)
    monkeypatch.setitem(sys.modules, "flash_attn_interface", renamed)
    attn_mod._FLASH.clear()
    with pytest.raises(AttentionUnavailable, match="not the version this toolkit calls"):
        resolve_on(monkeypatch, (9, 0), impl="fa3")
    assert resolve_on(monkeypatch, (9, 0)) == "sdpa"
