"""Figures of the GPU checks, collected for bench/gpu_check.sh's summary."""
import json
import os
from pathlib import Path

DEVICE = os.environ.get("GPU_CHECK_DEVICE", "cuda")


def record(section: str, key: str, value) -> None:
    """Add a figure to $GPU_CHECK_OUT/SECTION.json (what bench/gpu_check.sh summarises); no-op without it."""
    out = os.environ.get("GPU_CHECK_OUT")
    if not out:
        return
    path = Path(out) / f"{section}.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[key] = value
    path.write_text(json.dumps(data, indent=1, default=str))
