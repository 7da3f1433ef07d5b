"""Attention backends and document masks, checked against a loop-based reference."""
import math

import pytest
import torch

import lit_gpt.attention as attn_mod
from lit_gpt.attention import ENV_VAR, DocumentMask, attention, resolve_impl

# (n_head, n_kv): MHA, GQA, MQA
HEAD_LAYOUTS = [(4, 4), (4, 2), (4, 1)]


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


def qkv(B, T, H, KV, D=8, S=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = T if S is None else S
    return (
        torch.randn(B, T, H, D, generator=g),
        torch.randn(B, S, KV, D, generator=g),
        torch.randn(B, S, KV, D, generator=g),
    )


@pytest.fixture(autouse=True)
def _no_env_override(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


@pytest.mark.parametrize("H,KV", HEAD_LAYOUTS)
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_causal_matches_reference(impl, H, KV):
    q, k, v = qkv(2, 7, H, KV)
    ref = reference_attention(q, k, v, lambda b, t, s: s <= t)
    out = attention(q, k, v, impl=impl)
    assert out.shape == q.shape
    assert (out - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("H,KV", HEAD_LAYOUTS)
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_document_mask_matches_reference(impl, H, KV):
    # Row 1 reuses id 0 for a later, different document: ids only mark where documents change.
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2], [0, 0, 3, 3, 3, 0, 0, 0]])
    segs = [doc_segments(row.tolist()) for row in doc_ids]
    q, k, v = qkv(2, 8, H, KV, seed=1)
    ref = reference_attention(q, k, v, lambda b, t, s: s <= t and segs[b][s] == segs[b][t])
    out = attention(q, k, v, impl=impl, doc_mask=DocumentMask.from_doc_ids(doc_ids))
    assert (out - ref).abs().max() <= 1e-5
    # sanity: the mask matters, plain causal attention gives something else
    assert (attention(q, k, v, impl=impl) - ref).abs().max() > 1e-2


@pytest.mark.parametrize("H,KV", HEAD_LAYOUTS)
@pytest.mark.parametrize("with_docs", [False, True])
def test_sdpa_and_eager_agree(H, KV, with_docs):
    B, T = 3, 33
    q, k, v = qkv(B, T, H, KV, D=16, seed=2)
    doc_mask = None
    if with_docs:
        g = torch.Generator().manual_seed(3)
        doc_ids = (torch.rand(B, T, generator=g) < 0.15).long().cumsum(dim=1)
        doc_mask = DocumentMask.from_doc_ids(doc_ids)
    a = attention(q, k, v, impl="sdpa", doc_mask=doc_mask)
    b = attention(q, k, v, impl="eager", doc_mask=doc_mask)
    assert (a - b).abs().max() <= 1e-5


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_fewer_queries_than_keys_is_bottom_right_causal(impl):
    # The last T queries of an S-long sequence (what FlashAttention and incremental decoding assume).
    T, S = 3, 6
    q, k, v = qkv(1, T, 4, 2, S=S, seed=4)
    ref = reference_attention(q, k, v, lambda b, t, s: s <= t + (S - T))
    assert (attention(q, k, v, impl=impl) - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_explicit_attn_mask_replaces_causal(impl):
    T, S = 2, 5
    q, k, v = qkv(1, T, 2, 2, S=S, seed=5)
    mask = torch.tensor([[True, False, True, False, False], [True, True, True, True, False]])
    ref = reference_attention(q, k, v, lambda b, t, s: bool(mask[t, s]))
    out = attention(q, k, v, impl=impl, attn_mask=mask[None, None])
    assert (out - ref).abs().max() <= 1e-5


def test_document_mask_hand_example():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1], [1, 4, 4, 4, 9]])
    m = DocumentMask.from_doc_ids(doc_ids)
    assert m.positions.tolist() == [[0, 1, 2, 0, 1], [0, 0, 1, 2, 0]]
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


@pytest.mark.parametrize("impl", ["fa2", "fa3"])
def test_unavailable_flash_backend_raises(impl):
    q, k, v = qkv(1, 4, 2, 2)
    with pytest.raises(RuntimeError, match=f"attn_impl='{impl}'.*cannot run"):
        resolve_impl(impl, q)
    with pytest.raises(RuntimeError, match=impl):
        attention(q, k, v, impl=impl)


def test_auto_resolves_to_sdpa_on_cpu():
    q = torch.randn(1, 4, 2, 8)
    assert resolve_impl("auto", q) == "sdpa"
    assert resolve_impl("eager", q) == "eager"
    assert resolve_impl("sdpa", q) == "sdpa"


def test_env_var_steers_auto(monkeypatch):
    q, k, v = qkv(1, 5, 2, 1)
    monkeypatch.setenv(ENV_VAR, "eager")
    assert resolve_impl("auto", q) == "eager"
    # an explicit choice is not overridden by the environment
    assert resolve_impl("sdpa", q) == "sdpa"
    calls = []
    real_eager = attn_mod._eager
    monkeypatch.setattr(attn_mod, "_eager", lambda *a: calls.append(1) or real_eager(*a))
    attention(q, k, v, impl="auto")
    assert calls == [1]
    monkeypatch.setenv(ENV_VAR, "fa2")
    with pytest.raises(RuntimeError):
        resolve_impl("auto", q)
    monkeypatch.setenv(ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="bogus"):
        resolve_impl("auto", q)
