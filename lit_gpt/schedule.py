"""The learning-rate schedule and AdamW's parameter groups.

Neither has state of its own: the learning rate is a function of the optimizer step, which the checkpoint records.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCHEDULES = ("cosine", "wsd")


@dataclass(frozen=True)
class LRSchedule:
    """Linear warmup over `warmup_steps`, then cosine decay to `min_lr` at `max_steps`, or warmup-stable-decay
    ("wsd": constant, then linear decay to `min_lr` over the last `decay_fraction` of the steps)."""

    learning_rate: float
    min_lr: float
    warmup_steps: int
    max_steps: int
    schedule: str = "cosine"
    decay_fraction: float = 0.2

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"lr schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")

    def __call__(self, step: int) -> float:
        """Learning rate of optimizer step `step` (0-based)."""
        lr, min_lr, warmup, total = self.learning_rate, self.min_lr, self.warmup_steps, self.max_steps
        if step < warmup:
            return lr * (step + 1) / warmup
        if self.schedule == "wsd":
            decay_steps = max(1, int(self.decay_fraction * total))
            decay_start = total - decay_steps
            if step < decay_start:
                return lr
            return lr + (min_lr - lr) * min(1.0, (step - decay_start + 1) / decay_steps)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def is_decayed(name: str, decay_embeddings: bool) -> bool:
    """Whether weight decay applies to the parameter `name`: not to norms, biases and (unless asked) embeddings.

    Decided by name, not shape: FSDP1 flattens parameters, so ndim says nothing there."""
    is_norm = "norm" in name or "ln_f" in name or name.endswith(".bias")
    is_embedding = "wte" in name and not decay_embeddings
    return not (is_norm or is_embedding)


def parameter_groups(model: torch.nn.Module, weight_decay: float, decay_embeddings: bool = False) -> list[dict]:
    """AdamW's two parameter groups: [decayed with `weight_decay`, not decayed]."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (decay if is_decayed(name, decay_embeddings) else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
