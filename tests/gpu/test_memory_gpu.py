"""The memory estimate of --dry_run (lit_gpt.memory_estimate) against torch.cuda.max_memory_allocated on one GPU:
LLaMmlein_120M and LLaMmlein_1B at sequence length 2048 under bf16-mixed, two training steps as the trainer takes them
(Fabric, fused AdamW, the chunked loss; tests/memory_probe.py). Both figures, and the memory the allocator reserved and
the device had in use (what the estimate's overhead terms stand for), go to GPU_CHECK_OUT/memory.json.
GPU_CHECK_DEVICE=cpu runs the same at the smallest size on the CPU (peak resident memory instead)."""
import os

import pytest
from memory_probe import measure, run

from gpu.gpu_record import DEVICE, record
from lit_gpt.attention import resolve_backend
from lit_gpt.config import Config
from lit_gpt.memory_estimate import GiB, TrainingSetup, estimate_memory

QUICK = os.environ.get("GPU_CHECK_QUICK") == "1" or DEVICE == "cpu"
TOLERANCE = 0.20  # the acceptance bound
# The CPU smoke run: the smallest model whose activations outweigh the process's fixed overheads (the `micro` model's
# do not: its estimate is half the measured peak), at the size tests/test_memory_estimate.py checks on the CPU.
CASES = [("demo_5M", 2, {"block_size": 128})] if QUICK else [("LLaMmlein_120M", 8, {}), ("LLaMmlein_1B", 4, {})]


@pytest.mark.parametrize("model_name,micro_batch_size,overrides", CASES)
def test_estimate_matches_the_measured_peak(model_name, micro_batch_size, overrides, tmp_path):
    import torch

    spec = dict(model_name=model_name, micro_batch_size=micro_batch_size, precision="bf16-mixed", accelerator=DEVICE,
                overrides=overrides)
    config = Config.from_name(model_name, **overrides)
    device = torch.device(DEVICE)
    attn_impl = resolve_backend("auto", device, torch.bfloat16, config.head_size, needs_grad=True)
    estimate = estimate_memory(TrainingSetup(config, micro_batch_size, precision="bf16-mixed", attn_impl=attn_impl,
                                             device_type=DEVICE))
    figures = {"micro_batch_size": micro_batch_size, "seq_len": config.block_size, "attn_impl": attn_impl,
               "estimate_gib": estimate.allocated / GiB, "estimate_phase": estimate.phase,
               "estimate_total_gib": estimate.total / GiB}
    if DEVICE == "cuda":  # in this process: the allocator's own count
        torch.cuda.empty_cache()
        result = run(spec)
        free, total = torch.cuda.mem_get_info()
        figures.update(reserved_gib=torch.cuda.memory_reserved() / GiB, device_used_gib=(total - free) / GiB)
        torch.cuda.empty_cache()
    else:  # a fresh process for a clean peak resident set
        result = measure([spec], tmp_path)[0]
    ratio = estimate.allocated / result["peak"]
    figures.update(measured_gib=result["peak"] / GiB, ratio=ratio, device=result["device"],
                   measured_phases_gib={k: v / GiB for k, v in result["phases"].items()})
    record("memory", model_name, figures)
    assert abs(ratio - 1) <= TOLERANCE, figures
