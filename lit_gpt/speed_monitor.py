"""Throughput and model-FLOPs utilisation (MFU), counted on real (non-padding) tokens only."""
from __future__ import annotations

import time
from collections import deque
from typing import Optional

import torch

from lit_gpt.config import Config

# Dense bf16 peak FLOP/s per device (not the 2:4-sparse figures vendors also quote).
PEAK_BF16_FLOPS = {
    "H100 SXM": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H200": 989e12,
    "GH200": 989e12,
    "A100": 312e12,
}


def device_peak_flops(device: torch.device) -> Optional[float]:
    """Peak dense bf16 FLOP/s of a CUDA device, or None where unknown (e.g. CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if "H100" in name:
        # The SXM part reports itself as e.g. "NVIDIA H100 80GB HBM3"; PCIe and NVL parts say so in the name.
        return PEAK_BF16_FLOPS["H100 PCIe" if "PCIe" in name else "H100 NVL" if "NVL" in name else "H100 SXM"]
    for key, peak in PEAK_BF16_FLOPS.items():
        if key in name:
            return peak
    return None


def flops_per_token(config: Config, n_params: int, seq_len: Optional[int] = None) -> float:
    """Training FLOPs per token: 6 N (N = parameters without the embedding lookup) + 6 L H D T for attention."""
    non_embedding = n_params - config.padded_vocab_size * config.n_embd
    T = seq_len or config.block_size
    return 6 * non_embedding + 6 * config.n_layer * config.n_head * config.head_size * T


class SpeedMonitor:
    """Sliding-window tokens/s and MFU for the whole job (all ranks)."""

    def __init__(self, flops_per_token: float, world_size: int, peak_flops: Optional[float], window: int = 20) -> None:
        self.flops_per_token = flops_per_token
        self.world_size = world_size
        self.peak_flops = peak_flops
        self.samples: deque[tuple[float, int]] = deque(maxlen=window + 1)

    def update(self, total_tokens: int, now: Optional[float] = None) -> None:
        """Record the job-wide count of real tokens trained on so far."""
        self.samples.append((time.perf_counter() if now is None else now, total_tokens))

    def tokens_per_sec(self) -> Optional[float]:
        if len(self.samples) < 2:
            return None
        (t0, n0), (t1, n1) = self.samples[0], self.samples[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else None

    def mfu(self) -> Optional[float]:
        tps = self.tokens_per_sec()
        if tps is None or self.peak_flops is None:
            return None
        return tps * self.flops_per_token / (self.peak_flops * self.world_size)
