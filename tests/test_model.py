"""GPT model: causality, packed documents, GQA, backend agreement, KV cache, init scheme, HF Llama reference."""
import math

import pytest
import torch

import lit_gpt.attention as attn_mod
from lit_gpt.attention import ENV_VAR, AttentionUnavailable, DocumentMask
from lit_gpt.config import Config
from lit_gpt.model import GPT

IMPLS = ["sdpa", "eager"]
NO_GRAD_IMPLS = [*IMPLS, "flex"]  # flex has no backward pass on CPU


@pytest.fixture(autouse=True)
def _no_env_override(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


def make_model(seed=0, **overrides):
    """The small `micro` config (GQA: 4 heads, 2 groups) in fp32, with norm gains moved away from 1."""
    torch.manual_seed(seed)
    model = GPT(Config.from_name("micro", **overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm_1.weight", "norm_2.weight", "ln_f.weight")):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    return model


def tokens(B, T, vocab=512, seed=0):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def max_diff(a, b):
    return (a - b).abs().max().item()


# --------------------------------------------------------------------------------------------- causality


@pytest.mark.parametrize("impl", IMPLS)
@torch.no_grad()
def test_causality(impl):
    model = make_model(attn_impl=impl)
    T, t = 16, 9
    idx = tokens(2, T)
    changed = idx.clone()
    changed[:, t] = (idx[:, t] + 1) % 512
    a, b = model(idx), model(changed)
    assert max_diff(a[:, :t], b[:, :t]) <= 1e-6, "a later token changed earlier logits"
    per_position = (a[:, t:] - b[:, t:]).abs().amax(dim=(0, 2))
    assert (per_position > 1e-4).all(), f"positions >= t should change: {per_position}"


# ----------------------------------------------------------------------------------------- packed documents


@pytest.mark.parametrize("impl", NO_GRAD_IMPLS)
@torch.no_grad()
def test_packed_documents_equal_documents_alone(impl):
    model = make_model(attn_impl=impl)
    T = 16
    idx = tokens(2, T, seed=1)
    # Row 0: two documents. Row 1: three documents, the last reusing id 0.
    doc_ids = torch.tensor([[0] * 5 + [1] * 11, [0] * 6 + [1] * 4 + [0] * 6])
    segments = [[(0, 5), (5, 16)], [(0, 6), (6, 10), (10, 16)]]
    packed = model(idx, doc_ids=doc_ids)
    for row, segs in enumerate(segments):
        for start, end in segs:
            alone = model(idx[row : row + 1, start:end])
            assert max_diff(packed[row, start:end], alone[0]) <= 1e-5, (impl, row, start, end)
    # sanity: without the document mask the second document does see the first
    unmasked = model(idx)
    assert max_diff(unmasked[0, 5:], packed[0, 5:]) > 1e-3


@torch.no_grad()
def test_packed_documents_backends_agree_at_model_level():
    idx = tokens(2, 24, seed=2)
    doc_ids = torch.tensor([[0] * 7 + [1] * 9 + [2] * 8, [3] * 24])
    out = {impl: make_model(attn_impl=impl)(idx, doc_ids=doc_ids) for impl in NO_GRAD_IMPLS}
    assert max_diff(out["sdpa"], out["eager"]) <= 1e-5
    assert max_diff(out["flex"], out["eager"]) <= 1e-5


@pytest.mark.parametrize("impl", NO_GRAD_IMPLS)
@torch.no_grad()
def test_host_built_mask_gives_identical_outputs(impl):
    # What the loader hands over (metadata built in numpy) and what a caller passing only ids gets: the same logits.
    model = make_model(attn_impl=impl)
    idx = tokens(3, 32, seed=6)
    doc_ids = torch.tensor([[0] * 10 + [1] * 22, [0] * 32, [0] * 3 + [1] * 3 + [0] * 26])
    from_ids = model(idx, doc_ids=doc_ids)
    from_mask = model(idx, doc_mask=DocumentMask.from_doc_ids(doc_ids.numpy()))
    assert torch.equal(from_ids, from_mask)
    with pytest.raises(ValueError, match="not both"):
        model(idx, doc_ids=doc_ids, doc_mask=DocumentMask.from_doc_ids(doc_ids))


@pytest.mark.parametrize("impl,builder", [("sdpa", "bool_mask"), ("eager", "bool_mask"), ("flex", "create_block_mask")])
@torch.no_grad()
def test_mask_is_built_once_per_forward_not_per_layer(impl, builder, monkeypatch):
    model = make_model(attn_impl=impl, n_layer=3)
    owner = DocumentMask if builder == "bool_mask" else attn_mod
    calls = []
    real = getattr(owner, builder)
    monkeypatch.setattr(owner, builder, lambda *a, **kw: calls.append(1) or real(*a, **kw))
    model(tokens(2, 16), doc_ids=torch.tensor([[0] * 5 + [1] * 11, [0] * 16]))
    assert len(calls) == 1


# ------------------------------------------------------------------------------------- GQA / MHA / MQA


def gqa_to_mha_state_dict(model):
    """Rewrite a grouped-query state dict as full MHA by repeating every K/V head for its query heads."""
    c = model.config
    sd = {}
    for name, w in model.state_dict().items():
        if name.endswith("attn.attn.weight"):
            # rows: per query group, q_per_kv query heads, then one key head, then one value head
            grouped = w.view(c.n_query_groups, c.q_per_kv + 2, c.head_size, c.n_embd)
            q = grouped[:, : c.q_per_kv].reshape(c.n_head, c.head_size, c.n_embd)
            k = grouped[:, c.q_per_kv].repeat_interleave(c.q_per_kv, dim=0)
            v = grouped[:, c.q_per_kv + 1].repeat_interleave(c.q_per_kv, dim=0)
            # MHA layout: per head, [q, k, v]
            w = torch.stack([q, k, v], dim=1).reshape(3 * c.n_head * c.head_size, c.n_embd)
        sd[name] = w.clone()
    return sd


@pytest.mark.parametrize("groups", [2, 1])
@pytest.mark.parametrize("impl", IMPLS)
@torch.no_grad()
def test_gqa_equals_mha_with_repeated_kv_heads(groups, impl):
    gqa = make_model(n_query_groups=groups, attn_impl=impl)
    mha = GPT(Config.from_name("micro", n_query_groups=4, attn_impl=impl)).eval()
    mha.load_state_dict(gqa_to_mha_state_dict(gqa))
    idx = tokens(2, 20, seed=3)
    a, b = gqa(idx), mha(idx)
    assert max_diff(a, b) <= 1e-5
    doc_ids = torch.tensor([[0] * 8 + [1] * 12, [0] * 20])
    assert max_diff(gqa(idx, doc_ids=doc_ids), mha(idx, doc_ids=doc_ids)) <= 1e-5


@pytest.mark.parametrize("groups", [4, 2, 1], ids=["MHA", "GQA", "MQA"])
@pytest.mark.parametrize("with_docs", [False, True])
@torch.no_grad()
def test_sdpa_and_eager_models_agree(groups, with_docs):
    sdpa = make_model(n_query_groups=groups, attn_impl="sdpa")
    eager = GPT(Config.from_name("micro", n_query_groups=groups, attn_impl="eager")).eval()
    eager.load_state_dict(sdpa.state_dict())
    idx = tokens(3, 32, seed=4)
    doc_ids = torch.tensor([[0] * 10 + [1] * 22, [0] * 32, [0] * 3 + [1] * 3 + [2] * 26]) if with_docs else None
    assert max_diff(sdpa(idx, doc_ids=doc_ids), eager(idx, doc_ids=doc_ids)) <= 1e-5


# ------------------------------------------------------------------------------------------- KV cache


@pytest.mark.parametrize("impl", IMPLS)
@torch.no_grad()
def test_kv_cache_decoding_matches_full_forward(impl):
    model = make_model(attn_impl=impl)
    B, T, prompt = 2, 14, 5
    idx = tokens(B, T, seed=5)
    full = model(idx)
    model.set_kv_cache(batch_size=B)
    steps = [model(idx[:, :prompt], input_pos=torch.arange(prompt))]
    for t in range(prompt, T):
        steps.append(model(idx[:, t : t + 1], input_pos=torch.arange(t, t + 1)))
    incremental = torch.cat(steps, dim=1)
    assert incremental.shape == full.shape
    assert max_diff(incremental, full) <= 1e-5
    # a fresh cache (smaller than block_size) gives the same answer again
    model.set_kv_cache(batch_size=B, max_seq_length=T)
    again = torch.cat([model(idx[:, t : t + 1], input_pos=torch.tensor([t])) for t in range(T)], dim=1)
    assert max_diff(again, full) <= 1e-5
    model.clear_kv_cache()
    with pytest.raises(RuntimeError, match="KV cache"):
        model(idx[:, :1], input_pos=torch.tensor([0]))


def test_model_input_errors():
    model = make_model()
    with pytest.raises(ValueError, match="block_size"):
        model(tokens(1, 129))
    with pytest.raises(ValueError):
        model.set_kv_cache(batch_size=1, max_seq_length=129)
    model.set_kv_cache(batch_size=1)
    with pytest.raises(ValueError):
        model(tokens(1, 4), doc_ids=torch.zeros(1, 4, dtype=torch.long), input_pos=torch.arange(4))


@pytest.mark.parametrize("impl", ["fa2", "fa3", "fa4"])
def test_explicit_flash_backend_on_cpu_raises(impl):
    model = make_model(attn_impl=impl)
    with pytest.raises(AttentionUnavailable, match=f"attn_impl='{impl}'.*cannot run"):
        model(tokens(1, 8))


def test_explicit_flex_on_cpu_is_inference_only():
    model = make_model(attn_impl="flex")
    with pytest.raises(AttentionUnavailable, match="no backward pass on CPU"):
        model(tokens(1, 8))
    with torch.no_grad():
        assert max_diff(model(tokens(1, 8)), make_model(attn_impl="eager")(tokens(1, 8))) <= 1e-5


# ------------------------------------------------------------------------------------------- torch.compile


def block_inputs(model, idx, **kwargs):
    """The arguments GPT.forward passes to its first Block (backend and mask resolved outside the Blocks)."""
    captured = {}
    hook = model.transformer.h[0].register_forward_pre_hook(lambda module, args: captured.setdefault("args", args))
    model(idx, **kwargs)
    hook.remove()
    return captured["args"]


@pytest.mark.parametrize("impl", ["auto", "sdpa", "flex"])
@pytest.mark.parametrize("with_docs", [False, True])
def test_compiled_blocks_have_no_graph_breaks(impl, with_docs):
    model = make_model(attn_impl=impl)
    idx = tokens(2, 24, seed=8)
    doc_ids = torch.tensor([[0] * 7 + [1] * 17, [0] * 24]) if with_docs else None
    grad = impl != "flex"  # flex: forward only on CPU
    with torch.set_grad_enabled(grad):
        args = block_inputs(model, idx, doc_ids=doc_ids)
        torch._dynamo.reset()
        assert torch._dynamo.explain(model.transformer.h[0])(*args).graph_break_count == 0
        expected = model(idx, doc_ids=doc_ids)
        for block in model.transformer.h:  # what the trainer's --compile does
            block.compile(fullgraph=True, backend="aot_eager")
        compiled = model(idx, doc_ids=doc_ids)
        if with_docs:  # another packing of documents reuses the compiled Blocks (a recompile per batch would be fatal)
            other = torch.tensor([[0] * 3 + [1] * 4 + [2] * 17, [0] * 20 + [1] * 4])
            with torch._dynamo.config.patch(error_on_recompile=True):
                model(idx, doc_ids=other)
    assert max_diff(compiled, expected) <= 1e-5
    if grad:
        compiled.pow(2).mean().backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# ----------------------------------------------------------------------------------- initialisation


def check_init_scheme(model):
    c = model.config
    base = math.sqrt(2.0 / (5 * c.n_embd))
    proj = 1.0 / math.sqrt(c.n_embd) / c.n_layer
    scheme = {
        "attn.attn.weight": base,
        "mlp.fc_1.weight": base,
        "mlp.fc_2.weight": base,
        "transformer.wte.weight": base,
        "lm_head.weight": base,
        "attn.proj.weight": proj,
        "mlp.proj.weight": proj,
    }
    norms = ("norm_1.weight", "norm_2.weight", "ln_f.weight")
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), f"{name} was not (re)initialised"
        if name.endswith(norms):
            assert torch.equal(p, torch.ones_like(p)), name
            continue
        target = next((std for suffix, std in scheme.items() if name.endswith(suffix)), None)
        assert target is not None, f"{name} has no init scheme in this test"
        std, mean = p.std().item(), p.mean().item()
        assert abs(std / target - 1) <= 0.05, f"{name}: std {std:.5f}, expected {target:.5f}"
        assert abs(mean) <= 0.05 * target, f"{name}: mean {mean:.5f}"
    h = model.transformer.h
    assert not torch.equal(h[0].attn.attn.weight, h[1].attn.attn.weight), "layers share their init"


def big_enough_config():
    return Config.from_name("LLaMmlein_120M", n_layer=2)


def test_init_scheme_direct_construction():
    torch.manual_seed(0)
    check_init_scheme(GPT(big_enough_config()))


def materialise_from_meta():
    with torch.device("meta"):
        model = GPT(big_enough_config())
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))  # anything not re-initialised is caught by the finiteness check
    return model


def test_init_scheme_after_meta_and_init_weights():
    torch.manual_seed(1)
    model = materialise_from_meta()
    model.init_weights()
    check_init_scheme(model)


def test_init_scheme_fsdp_style_reset_parameters():
    # FSDP materialises a meta model by calling reset_parameters() on every module that owns parameters.
    torch.manual_seed(2)
    model = materialise_from_meta()
    with torch.no_grad():
        for module in model.modules():
            if next(module.parameters(recurse=False), None) is not None:
                module.reset_parameters()
    check_init_scheme(model)


# -------------------------------------------------------------------------------- HF Llama reference


@torch.no_grad()
def test_matches_hf_llama():
    transformers = pytest.importorskip("transformers")
    model = make_model(seed=6)  # micro: GQA, 4 heads in 2 groups
    c = model.config
    with torch.no_grad():  # larger weights than the default init, so that mistakes are not hidden in tiny logits
        for name, p in model.named_parameters():
            if not name.endswith(("norm_1.weight", "norm_2.weight", "ln_f.weight")):
                p.normal_(0.0, 0.15)
    hf_config = transformers.LlamaConfig(
        vocab_size=c.padded_vocab_size,
        hidden_size=c.n_embd,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head,
        num_key_value_heads=c.n_query_groups,
        head_dim=c.head_size,
        max_position_embeddings=c.block_size,
        rms_norm_eps=c.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": float(c.rope_base)},
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
        attn_implementation="eager",
    )
    hf = transformers.LlamaForCausalLM(hf_config).eval()

    ours = model.state_dict()
    mapped = {
        "model.embed_tokens.weight": ours["transformer.wte.weight"],
        "model.norm.weight": ours["transformer.ln_f.weight"],
        "lm_head.weight": ours["lm_head.weight"],
    }
    for i in range(c.n_layer):
        src, dst = f"transformer.h.{i}.", f"model.layers.{i}."
        fused = ours[src + "attn.attn.weight"].view(c.n_query_groups, c.q_per_kv + 2, c.head_size, c.n_embd)
        mapped[dst + "self_attn.q_proj.weight"] = fused[:, : c.q_per_kv].reshape(-1, c.n_embd)
        mapped[dst + "self_attn.k_proj.weight"] = fused[:, c.q_per_kv].reshape(-1, c.n_embd)
        mapped[dst + "self_attn.v_proj.weight"] = fused[:, c.q_per_kv + 1].reshape(-1, c.n_embd)
        mapped[dst + "self_attn.o_proj.weight"] = ours[src + "attn.proj.weight"]
        mapped[dst + "input_layernorm.weight"] = ours[src + "norm_1.weight"]
        mapped[dst + "post_attention_layernorm.weight"] = ours[src + "norm_2.weight"]
        mapped[dst + "mlp.gate_proj.weight"] = ours[src + "mlp.fc_1.weight"]
        mapped[dst + "mlp.up_proj.weight"] = ours[src + "mlp.fc_2.weight"]
        mapped[dst + "mlp.down_proj.weight"] = ours[src + "mlp.proj.weight"]
    missing, unexpected = hf.load_state_dict(mapped, strict=False)
    assert not unexpected
    assert not [k for k in missing if "rotary" not in k], missing

    idx = tokens(2, 40, seed=7)
    expected = hf(input_ids=idx).logits
    assert expected.abs().max() > 1.0  # the comparison is not between near-zero numbers
    for impl in IMPLS:
        model.config.attn_impl = impl
        assert max_diff(model(idx), expected) <= 1e-4, impl


def test_activation_checkpointing_gives_identical_gradients():
    torch.manual_seed(0)
    model = GPT(Config.from_name("micro"))
    idx = torch.randint(0, 512, (2, 16))
    doc_ids = torch.tensor([[0] * 6 + [1] * 10, [0] * 16])

    def grads(checkpointing: bool) -> dict:
        model.zero_grad()
        model.activation_checkpointing = checkpointing
        model(idx, doc_ids=doc_ids).float().pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, recomputed = grads(False), grads(True)
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=0, atol=0, msg=name)
    assert all(g.abs().sum() > 0 for g in plain.values())
