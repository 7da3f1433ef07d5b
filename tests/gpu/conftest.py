"""GPU checks (bench/gpu_check.sh runs them on one H100/H200). Skipped without CUDA, unless GPU_CHECK_DEVICE=cpu asks
for a smoke run of the same code on the CPU (tests/test_gpu_check.py does that)."""
import os

import pytest
import torch

from gpu.gpu_record import DEVICE


def pytest_collection_modifyitems(config, items):
    if DEVICE == "cuda" and not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU (bench/gpu_check.sh runs these on one)")
        for item in items:
            if "tests/gpu/" in str(item.fspath).replace(os.sep, "/"):
                item.add_marker(skip)
