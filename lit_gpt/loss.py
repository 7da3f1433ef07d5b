"""Token cross-entropy (plus the PaLM z-loss) computed in row chunks, for the trainer and the evaluation script.

`F.cross_entropy(logits.float(), ...)` on a [B*T, V] batch makes an fp32 copy of all logits and autograd keeps the fp32
log-probabilities for backward: at 8 x 2048 x 32,064 that is ~2 GiB each, on top of the bf16 logits. Here the logits
are upcast one chunk of rows at a time, and the gradient with respect to the logits is computed in the same pass and
kept in the logits' own dtype (the dtype autograd would hand to the lm_head anyway): peak extra memory is one fp32 chunk
plus one logits-sized gradient buffer. In fp32 the result equals `F.cross_entropy` to rounding.
"""
from __future__ import annotations

import torch

IGNORE_INDEX = -100
# fp32 elements per chunk. On GPUs big chunks keep the kernel launches per micro-batch few (16 Mi: 64 MiB, ~60 chunks
# for 8 x 2048 x 32,064); on CPUs small ones keep each pass over a chunk in cache.
CHUNK_ELEMENTS = {"cpu": 1 << 20}
DEFAULT_CHUNK_ELEMENTS = 1 << 24


class _ChunkedCrossEntropy(torch.autograd.Function):
    """(ce_sum, objective_sum) over rows whose label is not IGNORE_INDEX; objective = ce + z_loss * logsumexp^2.

    Only the objective is differentiable; the gradient is computed in forward, so backward is a scale."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, z_loss: float):
        rows, vocab = logits.shape
        step = max(1, CHUNK_ELEMENTS.get(logits.device.type, DEFAULT_CHUNK_ELEMENTS) // vocab)
        in_place = ctx.needs_input_grad[0] and logits.dtype == torch.float32
        grad = torch.empty_like(logits) if ctx.needs_input_grad[0] else None
        # fp64 accumulators: a sum of ~1e5 token losses in fp32 would drift by several ulps.
        ce_sum = torch.zeros((), dtype=torch.float64, device=logits.device)
        z_sum = torch.zeros((), dtype=torch.float64, device=logits.device)
        for start in range(0, rows, step):
            y = labels[start:start + step]
            real = y != IGNORE_INDEX
            target = y.masked_fill(~real, 0)[:, None]
            x = logits[start:start + step].float()
            log_probs = torch.log_softmax(x, dim=-1)  # one fused kernel; faster than logsumexp on CPU too
            ce_sum += torch.where(real, log_probs.gather(1, target).squeeze(1), 0.0).sum().neg()
            lse = x[:, 0] - log_probs[:, 0]
            if z_loss:
                z_sum += torch.where(real, lse.square(), 0.0).sum()
            if grad is not None:
                # d/dx (lse - x_y) = softmax - onehot(y); d/dx z * lse^2 = 2 z lse softmax. Rows without a label are
                # zeroed by a multiply (a mask, not a branch: no host sync). fp32 logits: built in the buffer itself.
                probs = torch.exp(log_probs, out=grad[start:start + step] if in_place else log_probs)
                keep = real.to(probs.dtype)
                probs.mul_((keep * (1.0 + 2.0 * z_loss * lse) if z_loss else keep)[:, None])
                probs.scatter_add_(1, target, keep.neg()[:, None])
                if not in_place:
                    grad[start:start + step] = probs
        ctx.save_for_backward(grad)
        ce = ce_sum.float()
        ctx.mark_non_differentiable(ce)
        return ce, (ce_sum + z_loss * z_sum).float()

    @staticmethod
    def backward(ctx, _grad_ce, grad_objective):
        (grad,) = ctx.saved_tensors
        # In place: no second logits-sized buffer. A second backward through the same graph would fail autograd's
        # saved-tensor version check, not silently use the scaled gradient.
        return grad.mul_(grad_objective.to(grad.dtype)), None, None


def token_losses(logits: torch.Tensor, labels: torch.Tensor, z_loss: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of cross-entropy over real tokens, sum of the training objective incl. z-loss), both fp32 scalars.

    logits: [..., V] in any float dtype; labels: [...] with IGNORE_INDEX (-100) on tokens that carry no loss.
    Backpropagate through the second value; the first is detached (for logging)."""
    return _ChunkedCrossEntropy.apply(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), float(z_loss))
