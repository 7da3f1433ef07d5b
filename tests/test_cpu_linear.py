"""lit_gpt.cpu_linear: oneDNN products for fp32 CPU training, torch's own Linear everywhere else."""
import pytest
import torch
import torch.nn.functional as F

import lit_gpt.cpu_linear as cpu_linear
from lit_gpt.config import Config
from lit_gpt.model import GPT

pytestmark = pytest.mark.skipif(not cpu_linear.ONEDNN_LINEAR, reason="oneDNN's linear exists only in x86 torch builds")


@pytest.fixture
def onednn_calls(monkeypatch):
    """Counts the calls of the oneDNN op (forward and input gradient both go through the module-level name)."""
    calls = []
    real = cpu_linear.onednn_linear

    def counted(x, weight):
        calls.append(tuple(x.shape))
        return real(x, weight)

    monkeypatch.setattr(cpu_linear, "onednn_linear", counted)
    return calls


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 37, 48, generator=g, requires_grad=True)
    weight = (torch.randn(80, 48, generator=g) * 0.1).requires_grad_()
    grad_out = torch.randn(3, 37, 80, generator=g)
    return x, weight, grad_out


def test_training_products_equal_an_fp64_reference(onednn_calls):
    x, weight, grad_out = _inputs()
    out = cpu_linear.linear(x, weight)
    out.backward(grad_out)
    assert onednn_calls == [(3, 37, 48), (3, 37, 80)]  # forward, then the input gradient
    x64, w64 = x.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    (x64 @ w64.t()).backward(grad_out.double())
    torch.testing.assert_close(out.double(), x64 @ w64.t(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weight.grad.double(), w64.grad, rtol=1e-5, atol=1e-5)


def test_only_the_weight_gradient_when_the_input_needs_none(onednn_calls):
    x, weight, grad_out = _inputs()
    cpu_linear.linear(x.detach(), weight).backward(grad_out)
    assert onednn_calls == [(3, 37, 48)]
    torch.testing.assert_close(weight.grad, grad_out.reshape(-1, 80).t() @ x.detach().reshape(-1, 48))


def test_inference_and_autocast_use_torchs_own_linear(onednn_calls):
    x, weight, _ = _inputs()
    with torch.no_grad():
        assert torch.equal(cpu_linear.linear(x, weight), F.linear(x, weight))  # bit-identical: exports verify exactly
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cpu_linear.linear(x, weight).dtype == torch.bfloat16
    assert cpu_linear.linear(x.detach().bfloat16(), weight.detach().bfloat16()).dtype == torch.bfloat16
    assert onednn_calls == []


def test_compiled_fullgraph_equals_eager():
    x, weight, grad_out = _inputs()
    compiled = torch.compile(lambda a, w: F.silu(cpu_linear.linear(a, w)), fullgraph=True)
    out = compiled(x, weight)
    out.backward(grad_out)
    grads = x.grad.clone(), weight.grad.clone()
    x.grad = weight.grad = None
    eager = F.silu(cpu_linear.linear(x, weight))
    eager.backward(grad_out)
    torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads, (x.grad, weight.grad), rtol=1e-6, atol=1e-6)


def test_a_training_step_of_the_model_uses_it(onednn_calls):
    config = Config.from_name("micro", vocab_size=64, padded_vocab_size=64, block_size=16)
    model = GPT(config)
    model(torch.randint(0, 64, (2, 16))).sum().backward()
    linears_per_block = 5  # fused QKV, attention output, the MLP's three
    # each Linear's forward and input gradient, lm_head included
    assert len(onednn_calls) == 2 * (config.n_layer * linears_per_block + 1)
