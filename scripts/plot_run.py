"""Plot training runs: loss (training and validation), benchmark scores, learning rate, tokens/s and MFU, each
against optimizer steps and against tokens seen, several runs overlaid in one PNG.

    python scripts/plot_run.py out/run                           # -> out/run/loss.png
    python scripts/plot_run.py out/a out/b --output compare.png  # runs overlaid, one colour each

Reads each OUT_DIR/metrics.jsonl as the trainer writes it; runs are named by their hparams.json (W&B name, else
model name). A panel that no run has data for (MFU on CPU) is left out; a step whose loss was not finite is a gap in
its line. The benchmark scores (lm-eval tasks, scored during training or by jobs on its checkpoints: lit_gpt.benchmarks)
are one line per task, its main metric (acc_norm, else acc, ...), one panel per metric, below the loss.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import sys
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path

import numpy as np

from lit_gpt.benchmarks import curves, read_benchmarks
from lit_gpt.checkpoint.publish import write_atomically
from lit_gpt.errors import InputError
from lit_gpt.metrics_log import read_metrics
from lit_gpt.run_dir import RunDir

# (record field, y-axis label); the loss panels also show the validation records' val_loss.
PANELS = (("loss", "loss"), ("lr", "learning rate"), ("tokens_per_sec", "tokens/s"), ("mfu", "MFU"))
X_AXES = (("step", "optimizer step"), ("tokens", "tokens seen"))


class RunError(Exception):
    """A run directory that cannot be plotted; the message names the path."""


@dataclass
class Run:
    name: str
    train: list[dict]  # records of logged training steps
    val: list[dict]  # validation records, with the tokens seen at their step added
    # per task: its main metric and records {"step", "tokens", "value"} of the checkpoints scored on it
    benchmarks: dict[str, tuple[str, list[dict]]] = dataclass_field(default_factory=dict)


def load_run(out_dir: Path, name: str | None = None) -> Run:
    path = RunDir(out_dir).metrics_jsonl
    if not out_dir.is_dir():
        raise RunError(f"{out_dir}: no such run directory")
    if not path.is_file():
        raise RunError(f"{path}: no metrics (did the run start?)")
    try:
        records, _ = read_metrics(path, log=lambda message: print(message, file=sys.stderr))
    except InputError as e:  # a line that is not a metrics record
        raise RunError(str(e)) from None
    train = [r for r in records if "loss" in r]
    if not train:
        raise RunError(f"{path}: no training steps logged")
    val = [r for r in records if "val_loss" in r]
    for record, tokens in zip(val, _tokens_at([r["step"] for r in val], train)):
        record["tokens"] = tokens
    benchmarks = {}
    scores = read_benchmarks(out_dir, records, log=lambda message: print(message, file=sys.stderr))
    for task, (metric, points) in curves(scores).items():
        # checkpoints that do not record their tokens (the original trainer's) get them from the training records
        interpolated = _tokens_at([step for step, _, _ in points], train)
        benchmarks[task] = (metric, [{"step": step, "tokens": tokens if tokens is not None else guess, "value": value}
                                     for (step, tokens, value), guess in zip(points, interpolated)])
    return Run(name or out_dir.name, train, val, benchmarks)


def _tokens_at(steps: list[int], train: list[dict]) -> list[float]:
    """Tokens seen at each of `steps`. Validation records carry no token count: interpolate between the logged steps
    around each (from step 0, token 0), or go on at the average rate after the last one (a run killed in between)."""
    logged = sorted((r["step"], r["tokens"]) for r in train)
    known_steps, known_tokens = np.array([0] + [s for s, _ in logged]), np.array([0] + [t for _, t in logged])
    rate = known_tokens[-1] / known_steps[-1]
    at = np.asarray(steps, dtype=float)
    return np.where(at <= known_steps[-1], np.interp(at, known_steps, known_tokens), at * rate).tolist()


def _values(records: list[dict], field: str) -> list[float]:
    return [math.nan if r.get(field) is None else float(r[field]) for r in records]


def build_figure(runs: list[Run]):
    """The figure and its axes by (panel field, x field); each line's label is "RUN: train" or "RUN: validation"."""
    # Imported here: matplotlib takes seconds to import, and bad input is reported before it is needed.
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, none assumed
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter, PercentFormatter

    # one formatter per axis: matplotlib binds each to the axis it formats
    formatters = {"tokens_per_sec": EngFormatter, "mfu": lambda: PercentFormatter(1.0), "tokens": EngFormatter}
    # A panel no run logged (MFU on a CPU) is left out rather than drawn empty; the loss is always there.
    panels = [(field, ylabel) for field, ylabel in PANELS
              if field == "loss" or any(r.get(field) is not None for run in runs for r in run.train)]
    # one panel per benchmark metric (accuracies and perplexities do not share a scale), right below the loss
    metrics = sorted({metric for run in runs for metric, _ in run.benchmarks.values()})
    panels[1:1] = [(f"benchmark:{metric}", f"benchmark {metric}") for metric in metrics]
    fig = Figure(figsize=(11, 3 * len(panels)), layout="constrained")
    grid = fig.subplots(len(panels), len(X_AXES), sharex="col", squeeze=False)
    axes = {}
    for row, (field, ylabel) in enumerate(panels):
        for col, (x_field, xlabel) in enumerate(X_AXES):
            ax = axes[field, x_field] = grid[row][col]
            for i, run in enumerate(runs):
                color = f"C{i % 10}"
                if field.startswith("benchmark:"):
                    _plot_benchmarks(ax, run, field.removeprefix("benchmark:"), x_field, color)
                    continue
                if any(r.get(field) is not None for r in run.train):
                    ax.plot(_values(run.train, x_field), _values(run.train, field), color=color, linewidth=1.2,
                            label=f"{run.name}: train")
                if field == "loss" and run.val:
                    ax.plot(_values(run.val, x_field), _values(run.val, "val_loss"), color=color, linestyle="--",
                            marker="o", markersize=4, label=f"{run.name}: validation")
            if field in formatters:
                ax.yaxis.set_major_formatter(formatters[field]())
            if x_field in formatters:
                ax.xaxis.set_major_formatter(formatters[x_field]())
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            if row == len(panels) - 1:
                ax.set_xlabel(xlabel)
    for (field, _), ax in axes.items():
        if (field == "loss" or field.startswith("benchmark:")) and ax.lines:
            ax.legend(fontsize="small")
    fig.suptitle(", ".join(run.name for run in runs))
    return fig, axes


def _plot_benchmarks(ax, run: Run, metric: str, x_field: str, color: str) -> None:
    """The run's tasks scored with `metric`: one colour per run, one marker and line style per task."""
    tasks = [task for task, (task_metric, _) in run.benchmarks.items() if task_metric == metric]
    for j, task in enumerate(tasks):
        points = run.benchmarks[task][1]
        ax.plot(_values(points, x_field), _values(points, "value"), color=color, marker="os^vDP*X"[j % 8],
                markersize=4, linestyle=("-", "--", ":", "-.")[j // 8 % 4], linewidth=1, label=f"{run.name}: {task}")


def _names(out_dirs: list[Path]) -> list[str]:
    """Each run's name: its W&B name or model name from hparams.json (the folder's name where it has none, e.g. the
    demo's "out" says nothing), or the path as given where two runs share a name."""
    names = [_run_name(d) for d in out_dirs]
    return names if len(set(names)) == len(names) else [str(d) for d in out_dirs]


def _run_name(out_dir: Path) -> str:
    try:
        hparams = json.loads(RunDir(out_dir).hparams.read_text(encoding="utf-8"))
        return str(hparams.get("wandb_name") or hparams["model_name"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # no (readable) hparams.json: the folder
        return out_dir.resolve().name


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dirs", type=Path, nargs="+", metavar="OUT_DIR", help="a run's output directory")
    p.add_argument("--output", type=Path, help="the PNG to write (default: OUT_DIR/loss.png for one run)")
    p.add_argument("--dpi", type=int, default=100)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    output = args.output or (args.out_dirs[0] / "loss.png" if len(args.out_dirs) == 1 else None)
    if output is None:
        print("error: several runs: give the PNG to write with --output FILE", file=sys.stderr)
        return 2
    try:
        runs = [load_run(d, name) for d, name in zip(args.out_dirs, _names(args.out_dirs))]
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    fig, _ = build_figure(runs)
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=args.dpi)
    try:
        write_atomically(output, png.getvalue())  # a plot being replaced stays whole until the new one is
    except OSError as e:
        print(f"error: {output}: cannot write the plot ({e.strerror or e})", file=sys.stderr)
        return 2
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
