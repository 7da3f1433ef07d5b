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


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory) -> dict:
    """The trainer's data without datatrove or a tokenizer (the GPU machine has neither): bench/gpu_data.py's
    synthetic documents (vocab 512, the `micro` model's), packed by the project's chunk writer."""
    from bench.gpu_data import write_dataset

    paths = write_dataset(tmp_path_factory.mktemp("gpu_data"))
    return {"train": paths["train"], "val": paths["val"], "tokenizer": ""}
