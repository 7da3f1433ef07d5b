"""Every attention backend this CUDA machine can run (fa3, fa4, fa2, flex, sdpa) against an fp32 eager reference.

bf16 inputs, grouped-query and multi-head layouts, with and without packed-document masks, forward and backward; then
the model with compiled Blocks and the training step's freedom from host-device synchronisation. Skipped without CUDA.
When GPU_CHECK_OUT names a directory, the measured errors (and which backend `auto` picks) are written to
GPU_CHECK_OUT/attention_gpu.json after every test.
"""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from lit_gpt.attention import AttentionUnavailable, DocumentMask, attention, prepare_mask, resolve_backend  # noqa: E402
from lit_gpt.config import Config  # noqa: E402
from lit_gpt.model import GPT  # noqa: E402

pytestmark = pytest.mark.gpu

BACKENDS = ["fa3", "fa4", "fa2", "flex", "sdpa"]
LAYOUTS = [(32, 4, 64), (8, 8, 128)]  # (heads, kv heads, head size): LLaMmlein 1B's GQA, and MHA at 128 like 7B
DEVICE = torch.device("cuda")
# bf16 keeps 8 bits of mantissa: outputs (|o| < ~4) within 2e-2, gradients within 5% of their largest magnitude.
OUT_TOL, GRAD_REL_TOL = 2e-2, 5e-2
RESULTS = {"device": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
           "torch": torch.__version__, "auto": {}, "skipped": {}, "max_by_backend": {}, "errors": {}, "compiled": {}}


def record(section: str, key: str, value) -> None:
    RESULTS[section][key] = value
    if section == "errors":  # key: backend/layout/masking
        worst = RESULTS["max_by_backend"].setdefault(key.split("/")[0], {})
        for name, error in value.items():
            worst[name] = max(worst.get(name, 0.0), error)
    out = os.environ.get("GPU_CHECK_OUT")
    if out:  # rewritten after every test: a run cut short still leaves what it measured
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "attention_gpu.json").write_text(json.dumps(RESULTS, indent=2))


def require(impl: str, head_size: int, masking: bool) -> None:
    try:
        resolve_backend(impl, DEVICE, torch.bfloat16, head_size, document_masking=masking, needs_grad=True)
    except AttentionUnavailable as e:
        record("skipped", impl, str(e))
        pytest.skip(str(e))


def random_doc_mask(B: int, T: int, mean_doc: int, seed: int) -> DocumentMask:
    """Documents of random length (crossing flex's 128-token blocks), built on the host as the loader does."""
    rng = np.random.default_rng(seed)
    return DocumentMask.from_doc_ids((rng.random((B, T)) < 1 / mean_doc).cumsum(axis=1))


def test_auto_choice_is_recorded():
    for masking in (False, True):
        choice = resolve_backend("auto", DEVICE, torch.bfloat16, 64, document_masking=masking, needs_grad=True)
        record("auto", "document_masking" if masking else "causal", choice)
        assert choice in BACKENDS


@pytest.mark.parametrize("with_docs", [False, True], ids=["causal", "docs"])
@pytest.mark.parametrize("H,KV,D", LAYOUTS, ids=[f"H{h}-KV{k}-D{d}" for h, k, d in LAYOUTS])
@pytest.mark.parametrize("impl", BACKENDS)
def test_backend_matches_fp32_eager(impl, H, KV, D, with_docs):
    require(impl, D, with_docs)
    B, T = 2, 1024
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v = (torch.randn(B, T, h, D, device=DEVICE, generator=g, dtype=torch.bfloat16).requires_grad_()
               for h in (H, KV, KV))
    doc_mask = random_doc_mask(B, T, mean_doc=200, seed=1).to(DEVICE) if with_docs else None
    out = attention(q, k, v, impl, prepare_mask(impl, doc_mask, T, T, DEVICE, torch.bfloat16))
    dout = torch.randn(out.shape, device=DEVICE, generator=g, dtype=torch.bfloat16)
    out.backward(dout)

    ref_inputs = [x.detach().float().requires_grad_() for x in (q, k, v)]
    ref = attention(*ref_inputs, "eager", doc_mask)
    ref.backward(dout.float())
    errors = {"out": (out.float() - ref).abs().max().item()}
    for name, x, r in zip(("dq", "dk", "dv"), (q, k, v), ref_inputs):
        errors[name] = (x.grad.float() - r.grad).abs().max().item()
        errors[name + "_rel"] = errors[name] / r.grad.abs().max().item()
    record("errors", f"{impl}/H{H}-KV{KV}-D{D}/{'docs' if with_docs else 'causal'}", errors)
    assert errors["out"] <= OUT_TOL * max(1.0, ref.abs().max().item()), errors
    assert all(errors[n + "_rel"] <= GRAD_REL_TOL for n in ("dq", "dk", "dv")), errors
    if with_docs:  # the comparison sees the mask: plain causal attention is far off
        assert (attention(*[x.detach().float() for x in (q, k, v)], "eager") - ref).abs().max() > 0.1


def small_model(impl: str) -> GPT:
    torch.manual_seed(0)
    config = Config.from_name("micro", n_embd=256, n_head=4, n_query_groups=2, block_size=256, attn_impl=impl)
    return GPT(config).to(DEVICE, torch.bfloat16)


def step(model, idx, doc_mask):
    model.zero_grad(set_to_none=True)
    logits = model(idx, doc_mask=doc_mask)
    logits.float().pow(2).mean().backward()
    return logits.detach().float(), {n: p.grad.float() for n, p in model.named_parameters()}


@pytest.mark.parametrize("impl", BACKENDS)
def test_compiled_blocks_match_eager(impl):
    # What --compile does: every Block compiled (inductor, fullgraph: no graph breaks), flex and the FlashAttention
    # ops inside them; another packing of documents must not recompile flex/sdpa (varlen ops may once, to dynamic).
    require(impl, 64, True)
    model = small_model(impl)
    idx = torch.randint(0, 512, (2, 256), device=DEVICE)
    masks = [random_doc_mask(2, 256, mean_doc=60, seed=s).to(DEVICE) for s in (2, 3)]
    expected, expected_grads = step(model, idx, masks[0])
    for block in model.transformer.h:
        block.compile(fullgraph=True)
    compiled, grads = step(model, idx, masks[0])
    with torch._dynamo.config.patch(error_on_recompile=impl in ("flex", "sdpa")):
        step(model, idx, masks[1])
    errors = {"logits": (compiled - expected).abs().max().item(),
              "grads_rel": max(((grads[n] - g).abs().max() / g.abs().max().clamp(min=1e-12)).item()
                               for n, g in expected_grads.items())}
    record("compiled", impl, errors)
    assert errors["logits"] <= OUT_TOL * max(1.0, expected.abs().max().item()), errors
    assert errors["grads_rel"] <= 0.1, errors


@pytest.mark.parametrize("impl", BACKENDS)
def test_training_step_does_not_synchronise(impl):
    # The loader's mask is pinned and copied without blocking; nothing in forward or backward waits for the GPU.
    require(impl, 64, True)
    model = small_model(impl)
    ids = torch.randint(0, 512, (2, 256)).pin_memory()
    host_mask = random_doc_mask(2, 256, mean_doc=60, seed=4).pin_memory()
    step(model, ids.to(DEVICE), host_mask.to(DEVICE))  # warm-up: kernel compilation may synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        idx, doc_mask = ids.to(DEVICE, non_blocking=True), host_mask.to(DEVICE, non_blocking=True)
        logits, _ = step(model, idx, doc_mask)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # and the mask built on the host gives exactly what the model computes from ids on the device
    with torch.no_grad():
        from_ids = model(idx, doc_ids=host_mask.segments.to(DEVICE))
        assert torch.equal(model(idx, doc_mask=doc_mask), from_ids)
