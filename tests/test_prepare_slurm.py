"""prepare_data.py --executor slurm on a real (one-node, localhost) Slurm cluster: one datatrove array job per stage
plus the finalize job, each depending on the one before, give the same dataset as the local run. Skips where Slurm cannot
be set up (bash cluster/install_ci_deps.sh installs slurm-wlm and munge; needs root)."""
from __future__ import annotations

import os
import re
import subprocess

import pytest
from test_data_pipeline import CLEANING, cleaning_corpus, dataset_bytes  # noqa: F401 (a fixture)
from test_prepare_data import prepare
from test_slurm import slurm  # noqa: F401,E402 (the local cluster fixture)

from lit_gpt.data_pipeline.plan import STAGING

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def _submit_from_here(cluster, monkeypatch) -> None:
    for key in [k for k in os.environ if k.startswith(("SLURM_", "SRUN_", "SBATCH_"))]:
        monkeypatch.delenv(key)  # pytest itself may run inside a Slurm job
    for key, value in {**cluster.env, "OMP_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(key, value)


def test_slurm_array_jobs_give_the_local_dataset(slurm, prepared_data, cleaning_corpus, tmp_path,  # noqa: F811
                                                 monkeypatch, capsys):
    args = ["--input", cleaning_corpus, "--tokenizer", prepared_data["tokenizer"], *CLEANING, "--tasks", "2"]
    assert prepare(*args, "--output_dir", tmp_path / "local", "--workers", "2") == 0

    _submit_from_here(slurm, monkeypatch)
    out, logs = tmp_path / "slurm", tmp_path / "logs"
    assert prepare(*args, "--output_dir", out, "--executor", "slurm", "--slurm_logs", logs, "--slurm_wait",
                   "--slurm_args", "--time=10 --cpus-per-task=1") == 0, slurm.logs()
    printed = capsys.readouterr().out
    for stage in ("hash", "repeats", "tokenize", "pack", "finalize"):
        assert f"{stage}: job " in printed
    assert "repeated paragraphs removed" in printed  # the finalize job's summary table
    tokenize_job = re.search(r"^tokenize: job (\d+) \(2 task", printed, re.M).group(1)
    assert len(list((logs / "prepare-tokenize").glob(f"{tokenize_job}_*.out"))) == 2  # one log per array task
    assert dataset_bytes(out) == dataset_bytes(tmp_path / "local")
    assert not (out / STAGING).exists()  # datatrove's logs and markers live beside the job logs
    # Submitting again finds the dataset complete and submits nothing.
    assert prepare(*args, "--output_dir", out, "--executor", "slurm", "--slurm_logs", logs) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_a_malformed_record_fails_its_job_cancels_the_rest_and_is_one_line(slurm, prepared_data, tmp_path,  # noqa: F811
                                                                           monkeypatch, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "gut"}\n{"text": kaputt}\n' + '{"text": "mehr"}\n' * 50, encoding="utf-8")
    _submit_from_here(slurm, monkeypatch)
    logs = tmp_path / "logs"
    assert prepare("--input", bad, "--tokenizer", prepared_data["tokenizer"], "--output_dir", tmp_path / "out",
                   "--tasks", "2", "--executor", "slurm", "--slurm_logs", logs, "--slurm_wait",
                   "--slurm_args", "--time=10 --cpus-per-task=1") == 2, slurm.logs()
    err = capsys.readouterr().err
    assert f"error: {bad}:2: invalid JSON" in err and "--on_error skip" in err
    queue = subprocess.run(["squeue", "-h", "-o", "%j %T"], capture_output=True, text=True, env=os.environ).stdout
    assert "prepare-" not in queue.replace("COMPLETING", ""), queue  # the later stages were cancelled
    assert not (tmp_path / "out" / "train").exists()
