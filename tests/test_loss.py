"""Chunked token cross-entropy against F.cross_entropy / logsumexp computed in float64 by autograd."""
import pytest
import torch
import torch.nn.functional as F

from lit_gpt import loss as loss_module
from lit_gpt.loss import token_losses


def reference(logits: torch.Tensor, labels: torch.Tensor, z_loss: float):
    """(ce_sum, objective_sum) and d objective / d logits, in float64 with plain autograd."""
    x = logits.detach().double().requires_grad_()
    flat, y = x.reshape(-1, x.shape[-1]), labels.reshape(-1)
    ce = F.cross_entropy(flat, y, ignore_index=-100, reduction="sum")
    objective = ce + z_loss * torch.logsumexp(flat[y != -100], dim=-1).square().sum()
    objective.backward()
    return ce.detach(), objective.detach(), x.grad


def batch(dtype, vocab=1000, ignored=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(3, 700, vocab, generator=g) * 4).to(dtype)
    labels = torch.randint(0, vocab, (3, 700), generator=g)
    labels[0, :ignored] = -100  # e.g. the padding of a last partial sample
    labels[2, -7:] = -100
    return logits, labels


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    # Many chunks per batch, and a last chunk that is only partly filled (2100 rows, 60 per chunk).
    monkeypatch.setitem(loss_module.CHUNK_ELEMENTS, "cpu", 60 * 1000 + 17)


@pytest.mark.parametrize("z_loss", [0.0, 1e-3, 0.5])
def test_fp32_equals_cross_entropy_and_its_gradient(z_loss):
    logits, labels = batch(torch.float32)
    logits.requires_grad_()
    ce, objective = token_losses(logits, labels, z_loss)
    (objective * 0.37).backward()
    ref_ce, ref_objective, ref_grad = reference(logits, labels, z_loss)
    assert ce.dtype == objective.dtype == torch.float32
    assert ce.item() == pytest.approx(ref_ce.item(), rel=1e-6)
    assert objective.item() == pytest.approx(ref_objective.item(), rel=1e-6)
    # fp32 softmax rounding: a few ulps of the largest gradient entry (F.cross_entropy in fp32 is no closer).
    assert (logits.grad.double() - 0.37 * ref_grad).abs().max() <= 2e-6 * (0.37 * ref_grad).abs().max()
    # Tokens without a label contribute nothing, to the loss or the gradient.
    assert logits.grad[labels == -100].abs().max() == 0
    if z_loss == 0:
        assert ce.item() == objective.item()


def test_bf16_gradient_in_logits_dtype_within_bf16_rounding():
    logits, labels = batch(torch.bfloat16)
    logits.requires_grad_()
    ce, objective = token_losses(logits, labels, 1e-3)
    objective.backward()
    ref_ce, ref_objective, ref_grad = reference(logits, labels, 1e-3)
    assert logits.grad.dtype == torch.bfloat16
    assert objective.item() == pytest.approx(ref_objective.item(), rel=1e-6)  # fp32 math on the bf16 values
    assert torch.allclose(logits.grad.double(), ref_grad, rtol=2**-7, atol=1e-6)


def test_all_tokens_ignored_and_no_grad_mode():
    logits = torch.randn(2, 5, 11, requires_grad=True)
    labels = torch.full((2, 5), -100)
    ce, objective = token_losses(logits, labels, 0.1)
    objective.backward()
    assert ce.item() == objective.item() == 0.0 and logits.grad.abs().max() == 0
    with torch.no_grad():  # validation: no gradient buffer at all
        ce, _ = token_losses(logits, torch.zeros(2, 5, dtype=torch.long))
    assert ce.item() == pytest.approx(F.cross_entropy(logits.detach().reshape(10, 11), torch.zeros(10, dtype=torch.long),
                                                      reduction="sum").item(), rel=1e-6)


def saved_bytes(fn) -> int:
    """Bytes that autograd keeps for backward while `fn` runs (counted once per tensor storage)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_keeps_less_for_backward_than_cross_entropy_on_an_fp32_copy():
    logits, labels = batch(torch.bfloat16, vocab=4000)
    logits.requires_grad_()
    logits_bytes = logits.numel() * logits.element_size()
    ours = saved_bytes(lambda: token_losses(logits, labels))
    plain = saved_bytes(lambda: F.cross_entropy(logits.reshape(-1, 4000).float(), labels.reshape(-1), reduction="sum"))
    assert ours <= logits_bytes * 1.01  # one gradient buffer in the logits' dtype
    assert plain >= 2 * logits_bytes  # the fp32 log-probabilities
