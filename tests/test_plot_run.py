"""scripts/plot_run.py: the plotted lines are the runs' metrics (read back from the figure), validation points sit at
the tokens seen at their step, missing data is a gap or a panel left out, runs are named by their hparams, and bad input
is one error line."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from scripts.plot_run import build_figure, load_run, main

# Two runs as the trainer logs them: run "cpu" with validation records and no MFU (null on CPU) and a non-finite
# loss at step 60; run "gpu" with MFU and no validation set, logged every 10 steps.
CPU_TRAIN = [{"iter": 4 * s, "step": s, "loss": loss, "lr": 1e-3 * s / 80, "grad_norm": 1.0, "tokens": tokens,
              "tokens_per_sec": tps, "mfu": None, "skipped_steps": 0, "memory_gb": 0.5, "time": s / 10}
             for s, loss, tokens, tps in [(20, 7.5, 1000, 900.0), (40, 6.0, 2100, 950.0), (60, None, 3000, 1000.0),
                                          (80, 4.5, 4000, 1020.0)]]
CPU_VAL = [{"iter": 120, "step": 30, "val_loss": 6.4}, {"iter": 320, "step": 80, "val_loss": 4.9}]
GPU_TRAIN = [{"iter": s, "step": s, "loss": 8.0 - s / 20, "lr": 2e-4, "grad_norm": 0.5, "tokens": 4096 * s,
              "tokens_per_sec": 5e5 + s, "mfu": 0.40 + s / 1000, "skipped_steps": 0, "memory_gb": 30.0,
              "time": s / 2} for s in range(10, 60, 10)]


def write_run(path, records, tail: str = ""):
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return path


@pytest.fixture
def runs(tmp_path):
    # records in the order the trainer writes them (validation after the training record of its step or before)
    cpu = write_run(tmp_path / "cpu", [CPU_TRAIN[0], CPU_TRAIN[1], CPU_VAL[0], CPU_TRAIN[2], CPU_TRAIN[3], CPU_VAL[1]],
                    tail='{"iter": 3')  # torn last line: a run killed mid-append
    gpu = write_run(tmp_path / "gpu", GPU_TRAIN)
    return cpu, gpu


def line(ax, label):
    (found,) = [ln for ln in ax.get_lines() if ln.get_label() == label]
    return np.asarray(found.get_xdata(), float), np.asarray(found.get_ydata(), float)


def test_lines_are_the_metrics(runs):
    cpu, gpu = runs
    fig, axes = build_figure([load_run(cpu), load_run(gpu)])

    x, y = line(axes["loss", "step"], "cpu: train")
    assert x.tolist() == [20, 40, 60, 80]
    np.testing.assert_array_equal(y, [7.5, 6.0, math.nan, 4.5])  # the non-finite step is a gap
    x, y = line(axes["loss", "tokens"], "gpu: train")
    assert x.tolist() == [4096 * s for s in range(10, 60, 10)] and y.tolist() == [r["loss"] for r in GPU_TRAIN]
    assert line(axes["lr", "step"], "cpu: train")[1].tolist() == [2.5e-4, 5e-4, 7.5e-4, 1e-3]
    assert line(axes["tokens_per_sec", "tokens"], "cpu: train")[1].tolist() == [900, 950, 1000, 1020]

    # Validation at step 30 lies halfway between the steps logged at 20 (1000 tokens) and 40 (2100 tokens).
    x, y = line(axes["loss", "step"], "cpu: validation")
    assert x.tolist() == [30, 80] and y.tolist() == [6.4, 4.9]
    assert line(axes["loss", "tokens"], "cpu: validation")[0].tolist() == [1550, 4000]
    assert [ln.get_label() for ln in axes["loss", "step"].get_lines()] == ["cpu: train", "cpu: validation",
                                                                          "gpu: train"]

    # MFU: only the GPU run has it; the CPU run draws no line rather than an empty one.
    assert [ln.get_label() for ln in axes["mfu", "step"].get_lines()] == ["gpu: train"]
    assert line(axes["mfu", "step"], "gpu: train")[1].tolist() == [r["mfu"] for r in GPU_TRAIN]
    # Each run keeps its colour in every panel.
    colors = {ln.get_label(): ln.get_color() for ax in axes.values() for ln in ax.get_lines()}
    assert colors["cpu: train"] == colors["cpu: validation"] != colors["gpu: train"]


def test_validation_after_the_last_logged_step_extrapolates(tmp_path):
    run = write_run(tmp_path / "killed", CPU_TRAIN[:2] + [{"iter": 200, "step": 50, "val_loss": 5.5}])
    _, axes = build_figure([load_run(run)])
    assert line(axes["loss", "tokens"], "killed: validation")[0].tolist() == [50 * 2100 / 40]


def test_panels_without_data_are_left_out(runs):
    fig, axes = build_figure([load_run(runs[0])])
    assert {field for field, _ in axes} == {"loss", "lr", "tokens_per_sec"}  # no MFU on a CPU run
    assert len(fig.axes) == 6
    _, both = build_figure([load_run(run) for run in runs])
    assert {field for field, _ in both} == {"loss", "lr", "tokens_per_sec", "mfu"}


def test_writes_png(runs, tmp_path, capsys):
    import matplotlib.image

    cpu, gpu = runs
    assert main([str(cpu)]) == 0
    image = matplotlib.image.imread(cpu / "loss.png")
    assert image.shape[:2] == (900, 1100)  # figsize 11x9 inches at 100 dpi: three panels (no MFU on CPU)
    assert main([str(cpu), str(gpu), "--output", str(tmp_path / "both.png")]) == 0
    both = matplotlib.image.imread(tmp_path / "both.png")
    assert both.shape[:2] == (1200, 1100)  # the GPU run brings the MFU panel
    assert not [p for p in tmp_path.rglob(".*")]  # no temporary file left beside the plots

    # Two runs in folders of the same name are told apart by their paths; a run's hparams name it.
    other = write_run(tmp_path / "b" / "cpu", GPU_TRAIN)
    from scripts.plot_run import _names
    assert _names([cpu, other]) == [str(cpu), str(other)]
    (gpu / "hparams.json").write_text(json.dumps({"model_name": "demo_5M", "wandb_name": ""}))
    assert _names([cpu, gpu]) == ["cpu", "demo_5M"]
    (gpu / "hparams.json").write_text(json.dumps({"model_name": "demo_5M", "wandb_name": "first try"}))
    assert _names([cpu, gpu]) == ["cpu", "first try"]


@pytest.mark.parametrize("case", ["missing", "empty", "no_train", "corrupt", "several_without_output"])
def test_bad_input_is_one_error_line(tmp_path, capsys, case):
    run = tmp_path / "run"
    if case == "empty":
        run.mkdir()
    elif case == "no_train":
        write_run(run, CPU_VAL)
    elif case == "corrupt":
        write_run(run, CPU_TRAIN)
        (run / "metrics.jsonl").write_text("not json\n" + (run / "metrics.jsonl").read_text())
    args = [str(run)] + ([str(run)] if case == "several_without_output" else [])
    assert main(args) == 2  # an exception would fail the test here: no traceback reaches the user
    (message,) = capsys.readouterr().err.strip().splitlines()
    expected = {"missing": f"{run}: no such run directory", "empty": f"{run / 'metrics.jsonl'}: no metrics",
                "no_train": "no training steps logged", "corrupt": "line 1 is not a metrics record",
                "several_without_output": "--output"}[case]
    assert message.startswith("error: ") and expected in message
    assert not (run / "loss.png").exists()

