"""CPU checks of the CUDA path's memory and precision rules (issue: the GPU check answers the MFU question): SDPA
with document masks and grouped-query attention keeps a fused kernel, the memory estimate counts what that path
saves, bf16-true starts from the fp32 weights, `ddp` is DDP on one device, FSDP2 leaves RoPE's tables in fp32 and
attention's backward does not keep the fused qkv buffer alive."""
import pytest
import torch
import torch.nn.functional as F

from lit_gpt.attention import DocumentMask, attention
from lit_gpt.config import Config
from lit_gpt.memory_estimate import TrainingSetup, block_activation_bytes
from lit_gpt.model import GPT, Block

GQA = dict(n_layer=2, n_head=8, n_query_groups=2, n_embd=128, intermediate_size=256, vocab_size=512, block_size=64)


def saved_storages(fn) -> tuple[object, dict[int, int]]:
    """fn()'s result and the storages (data pointer -> bytes) of the tensors autograd saved while it ran."""
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


def test_masked_gqa_sdpa_expands_kv_heads_and_matches_eager(monkeypatch):
    # On CUDA only SDPA's flash kernel takes enable_gqa, and it takes no mask: the masked call must get as many key
    # and value heads as query heads, or it runs the math kernel.
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        calls.append((q.shape[1], k.shape[1], v.shape[1], attn_mask is not None, kw.get("enable_gqa", False)))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 16, 8, 16), torch.randn(2, 16, 2, 16), torch.randn(2, 16, 2, 16)
    mask = DocumentMask.from_doc_ids(torch.tensor([[0] * 5 + [1] * 11, [0] * 9 + [1] * 7]))
    out = attention(q, k, v, "sdpa", mask)
    assert calls == [(8, 8, 8, True, False)]
    torch.testing.assert_close(out, attention(q, k, v, "eager", mask), rtol=1e-5, atol=1e-5)


def test_memory_estimate_counts_the_expanded_kv_of_masked_gqa_sdpa():
    """The estimate's per-Block difference between document-masked and causal SDPA equals what autograd saves."""
    config = Config.from_name("micro", **GQA)
    torch.manual_seed(0)
    block = Block(config)
    B, T = 2, config.block_size
    x = torch.randn(B, T, config.n_embd, requires_grad=True)
    cos, sin = torch.ones(T, config.head_size), torch.zeros(T, config.head_size)
    doc_mask = DocumentMask.from_doc_ids(torch.tensor([[0] * 20 + [1] * 44, [0] * 40 + [1] * 24]))
    from lit_gpt.attention import prepare_mask

    additive = prepare_mask("sdpa", doc_mask, T, T, x.device, x.dtype)
    _, causal = saved_storages(lambda: block(x, cos, sin, None, None, "sdpa"))
    _, masked = saved_storages(lambda: block(x, cos, sin, additive, None, "sdpa"))
    masked.pop(additive.untyped_storage().data_ptr())  # the mask is shared by every layer: counted once per pass
    measured = sum(masked.values()) - sum(causal.values())
    setup = dict(config=config, micro_batch_size=B, precision="32-true", attn_impl="sdpa", device_type="cpu")
    estimated = (block_activation_bytes(TrainingSetup(**setup, document_masking=True))
                 - block_activation_bytes(TrainingSetup(**setup)))
    assert measured > 0 and estimated == measured, (estimated, measured)


@pytest.mark.parametrize("shape", [(3, 5), (64, 48)])  # CPU torch draws bf16 normals of < 16 values differently
def test_bf16_true_starts_from_the_fp32_weights(shape):
    config = Config.from_name("micro", n_embd=shape[0], padded_vocab_size=shape[1], vocab_size=shape[1], n_head=1,
                              n_query_groups=1, intermediate_size=8)
    torch.manual_seed(3)
    reference = GPT(config)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        torch.manual_seed(3)
        bf16 = GPT(config)
    finally:
        torch.set_default_dtype(default)
    for (name, p32), (_, p16) in zip(reference.named_parameters(), bf16.named_parameters()):
        assert p16.dtype == torch.bfloat16
        assert torch.equal(p16, p32.to(torch.bfloat16)), name


def test_ddp_on_one_device_is_ddp():
    from lightning.fabric.strategies import DDPStrategy

    from lit_gpt.distributed import make_strategy

    assert isinstance(make_strategy("ddp", 1), DDPStrategy)


def test_fsdp2_bf16_leaves_rope_tables_fp32(tmp_path):
    import torch.distributed as dist

    from lit_gpt.distributed import fsdp2_mixed_precision, fsdp2_parallelize

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        torch.manual_seed(0)
        model = GPT(Config.from_name("micro"))
        seen = []
        for block in model.transformer.h:
            block.attn.register_forward_pre_hook(lambda _m, args: seen.append((args[1].dtype, args[2].dtype)))
        fsdp2_parallelize(model, init_device_mesh("cpu", (1,)), mp_policy=fsdp2_mixed_precision(torch.bfloat16))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(torch.randint(0, 512, (2, 32)))
    finally:
        dist.destroy_process_group()
    assert seen and all(dtypes == (torch.float32, torch.float32) for dtypes in seen), seen


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_attention_backward_keeps_no_view_of_the_fused_qkv(impl):
    config = Config.from_name("micro", **GQA)
    torch.manual_seed(0)
    attn = Block(config).attn
    B, T = 2, config.block_size
    x = torch.randn(B, T, config.n_embd, requires_grad=True)
    cos, sin = torch.ones(T, config.head_size), torch.zeros(T, config.head_size)
    fused = []
    attn.attn.register_forward_hook(lambda _m, _args, out: fused.append(out.untyped_storage().data_ptr()))
    _, saved = saved_storages(lambda: attn(x, cos, sin, None, None, impl))
    assert len(fused) == 1 and saved and fused[0] not in saved
