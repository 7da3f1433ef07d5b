"""bench/gpu_check.sh end to end as a CPU smoke run (GPU_CHECK_DEVICE=cpu, smallest sizes): the parts run, the
trainer tests pass on the CPU, and the summary holds every section the GPU run reports."""
import json
import os
import subprocess

import pytest
from conftest import ROOT


@pytest.mark.slow
def test_gpu_check_script_runs_every_part_and_summarises(tmp_path):
    env = {**os.environ, "GPU_CHECK_DEVICE": "cpu", "GPU_CHECK_QUICK": "1", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "check"
    result = subprocess.run(["bash", "bench/gpu_check.sh", str(out)], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=900)
    summary = json.loads((out / "gpu_check.json").read_text())
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    ran = {name: part for name, part in summary["parts"].items() if part["rc"] is not None}
    assert set(ran) == {"trainer", "memory", "mfu_eager"} and all(p["rc"] == 0 for p in ran.values()), summary["parts"]
    trainer = summary["tests"]["trainer"]
    assert trainer and all(v == "passed" for v in trainer.values()), trainer
    assert {"reference", "fsdp_full_shard", "resume"} <= set(summary["trainer"])
    assert summary["trainer"]["resume"]["max_loss_diff"] <= 1e-5  # on the CPU the resume is exact
    rows = summary["mfu_eager"]
    assert [r["compile"] for r in rows] == [False] and rows[0]["tokens_per_sec"] > 0
    assert summary["memory"]  # the estimate against the measured peak
    report = (out / "gpu_check.md").read_text()
    for heading in ("## Trainer on CUDA", "## Throughput and MFU (eager)"):
        assert heading in report
