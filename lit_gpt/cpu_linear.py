"""The Linear layers' fp32 training matmuls on x86 CPUs through oneDNN instead of MKL.

PyTorch's CPU `mm` calls MKL's sgemm; oneDNN (built into every x86 PyTorch, and what Intel's own PyTorch extension
uses for Linear layers) computes the same products with its JIT kernels. On the AMD EPYC machines this project is
tested on, at demo_25M's training shapes, oneDNN's forward products are up to 30 % faster than MKL's and its input
gradients mostly faster (4-10 % over all Linear products of a step), while the weight gradient (a product of two
transposed operands) is faster on MKL, so it stays there (bench/bench_linear.py measures all three on the machine at
hand). Only training uses this path (grad mode on, fp32,
no autocast): inference computes exactly what PyTorch's own Linear (and so transformers) computes.

The product is a custom op, so torch.compile keeps it as one opaque call inside the compiled Blocks.
"""
from __future__ import annotations

import platform

import torch
from torch import library


def _onednn_linear_available() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available():
        return False
    return hasattr(torch.ops.mkldnn, "_linear_pointwise")  # inductor's own oneDNN linear, in x86 builds since 2.0


ONEDNN_LINEAR = _onednn_linear_available()


@library.custom_op("lit_gpt::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T for x [..., in] and weight [out, in] (any strides), computed by oneDNN."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


@onednn_linear.register_fake
def _(x, weight):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_out):
    x, weight = ctx.saved_tensors
    grad_x = onednn_linear(grad_out, weight.t()) if ctx.needs_input_grad[0] else None
    grad_weight = None
    if ctx.needs_input_grad[1]:
        grad_weight = grad_out.reshape(-1, grad_out.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
    return grad_x, grad_weight


onednn_linear.register_autograd(_backward, setup_context=_setup_context)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Bias-free `F.linear`, through oneDNN for fp32 training on x86 CPUs."""
    if (ONEDNN_LINEAR and x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")):
        return onednn_linear(x, weight)
    return torch.nn.functional.linear(x, weight)
