"""The trainer's loggers (TensorBoard, W&B offline, the CSV records) and its profiler window, in real runs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_trainer import STEPS, metrics, train, train_losses


def wandb_history(run_dir) -> dict[int, dict]:
    """The metrics a W&B offline run recorded (step -> values), read from its .wandb log by wandb's own reader
    (`wandb leet inspect --json`, one JSON record per line)."""
    (path,) = run_dir.glob("run-*.wandb")
    result = subprocess.run([str(Path(sys.executable).parent / "wandb"), "leet", "inspect", str(path), "--json"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    history = {}
    for line in result.stdout.splitlines():
        record = json.loads(line)
        if record.get("type") == "history":
            values = record["history"]["item"]
            if "trainer/global_step" in values:
                history.setdefault(int(values["trainer/global_step"]), {}).update(values)
    return history


@pytest.mark.slow
def test_wandb_offline_run_holds_the_metrics_and_a_resume_appends_to_it(prepared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    common = dict(logger="tensorboard,wandb,csv", wandb_project="llammlein-test", wandb_tags="ci,cpu")
    train(prepared_data, tmp_path, stop_at_step=3, **common)
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    train(prepared_data, tmp_path, resume="auto", **common)
    assert (tmp_path / "wandb_run_id").read_text().strip() == run_id  # the same run, continued
    runs = sorted((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 2  # one per job, both of run `run_id`: `wandb sync` appends the second to the first
    first, second = wandb_history(runs[0]), wandb_history(runs[1])
    assert sorted(first) == [1, 2, 3] and sorted(second) == [4, 5]
    losses = train_losses(tmp_path)
    for step, values in {**first, **second}.items():
        assert values["loss"] == pytest.approx(losses[step], rel=1e-6)


def test_loggers_flag_is_checked(prepared_data, tmp_path):
    result = train(prepared_data, tmp_path / "out", check=False, logger="tensorboard,mlflow")
    assert result.returncode == 2
    assert "error: --logger: 'mlflow' not among tensorboard, wandb, csv" in result.stderr


@pytest.mark.slow
def test_without_csv_and_tensorboard_only_metrics_jsonl_is_written(prepared_data, tmp_path):
    train(prepared_data, tmp_path, logger="tensorboard", max_steps=2)
    assert (tmp_path / "metrics.jsonl").is_file() and not (tmp_path / "metrics.csv").exists()
    assert sorted(train_losses(tmp_path)) == [1, 2]


@pytest.mark.slow
def test_profiler_window_records_exactly_those_steps(prepared_data, tmp_path):
    train(prepared_data, tmp_path / "off")
    assert not (tmp_path / "off" / "profile").exists()  # off by default
    train(prepared_data, tmp_path / "on", profile_steps="2:4")
    trace = json.loads((tmp_path / "on" / "profile" / "rank0.pt.trace.json").read_text())
    spans = {e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("train_step#")}
    assert spans == {"train_step#2", "train_step#3"}
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"aten::mm", "aten::addmm"} & names  # the steps' work is in it
    # Profiling changes nothing the run computes.
    assert train_losses(tmp_path / "on") == train_losses(tmp_path / "off")
    assert len(metrics(tmp_path / "on")) == STEPS


@pytest.mark.parametrize("spec", ["5", "4:2", "a:b"])
def test_profile_steps_flag_is_checked(prepared_data, tmp_path, spec):
    result = train(prepared_data, tmp_path / "out", check=False, profile_steps=spec)
    assert result.returncode == 2 and "error: --profile_steps:" in result.stderr, result.stderr[-1000:]
    assert not os.path.exists(tmp_path / "out")
