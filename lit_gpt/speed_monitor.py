"""Throughput and model-FLOPs utilisation (MFU), counted on real (non-padding) tokens only."""
from __future__ import annotations

import time
from collections import deque

import torch

from lit_gpt.config import Config

# Dense bf16 peak FLOP/s per device from the vendors' data sheets (not the 2:4-sparse figures they also quote). Matched
# against the CUDA device name in this order: the most specific names first ("H200 NVL" before "H200").
PEAK_BF16_FLOPS = (
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM: reports itself as e.g. "NVIDIA H100 80GB HBM3"
    ("H200 NVL", 835e12),
    ("H200", 989e12),  # SXM
    ("GH200", 989e12),
    ("H800", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
)

MFU_CONVENTION = "PaLM/litgpt: 6N + 12*L*H*Q*T FLOPs per token, N = parameters without the input embedding"


def device_peak_flops(device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of a CUDA device, or None where unknown (e.g. CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


def matmul_parameters(config: Config, n_params: int) -> int:
    """N of the MFU formula: every parameter but the input embedding, a table lookup that does no matmul (the
    untied lm_head is a matmul and counts)."""
    return n_params - config.padded_vocab_size * config.n_embd


def flops_per_token(config: Config, n_params: int, seq_len: int | None = None) -> float:
    """Training FLOPs per token in the PaLM convention (Chowdhery et al. 2022, appendix B; litgpt and nanoGPT use it
    too): 6 N for the matmuls of forward and backward, plus 12 L H Q T for attention scores and values (H heads of size
    Q, sequence length T, counted without causal masking). N is `matmul_parameters`; litgpt counts the input embedding
    as well, which adds 6 V d per token (+5.4 % for LLaMmlein_1B)."""
    T = seq_len or config.block_size
    return 6 * matmul_parameters(config, n_params) + 12 * config.n_layer * config.n_head * config.head_size * T


class SpeedMonitor:
    """Tokens/s, MFU and the time left, for the whole job (all ranks), from the log steps' records.

    The rate printed is that of the last log interval, so it follows the run as it is now (an average over many
    intervals lags behind a change of speed by all of them); `smoothed_tokens_per_sec` is the mean over the last
    `window` intervals, for a steadier curve. The ETA is the last interval's time per step times the steps left."""

    def __init__(self, flops_per_token: float, world_size: int, peak_flops: float | None, window: int = 5) -> None:
        self.flops_per_token = flops_per_token
        self.world_size = world_size
        self.peak_flops = peak_flops
        self.records: deque[tuple[float, int, int]] = deque(maxlen=window + 1)  # (time, step, tokens)

    def update(self, step: int, total_tokens: int, now: float | None = None) -> None:
        """Record the job-wide count of real tokens trained on after optimizer step `step`."""
        self.records.append((time.perf_counter() if now is None else now, step, total_tokens))

    def _rate(self, first: int) -> float | None:
        if len(self.records) < 2:
            return None
        (t0, _, n0), (t1, _, n1) = self.records[first], self.records[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else None

    def tokens_per_sec(self) -> float | None:
        """Real tokens per second over the last log interval."""
        return self._rate(-2)

    def smoothed_tokens_per_sec(self) -> float | None:
        """Real tokens per second over the last `window` log intervals (fewer at the start)."""
        return self._rate(0)

    def mfu(self) -> float | None:
        tps = self.tokens_per_sec()
        if tps is None or self.peak_flops is None:
            return None
        return tps * self.flops_per_token / (self.peak_flops * self.world_size)

    def eta_seconds(self, last_step: int) -> float | None:
        """Seconds until optimizer step `last_step`, at the last interval's time per step."""
        if len(self.records) < 2:
            return None
        (t0, s0, _), (t1, s1, _) = self.records[-2], self.records[-1]
        return (t1 - t0) / (s1 - s0) * max(0, last_step - s1) if s1 > s0 else None
