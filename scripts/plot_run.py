"""Plot training runs: loss (training and validation), learning rate, tokens/s and MFU, each against optimizer steps
and against tokens seen, several runs overlaid in one PNG.

    python scripts/plot_run.py out/run                           # -> out/run/loss.png
    python scripts/plot_run.py out/a out/b --output compare.png  # runs overlaid, one colour each

Reads each OUT_DIR/metrics.jsonl as the trainer writes it. A panel that no run has data for (MFU on CPU, validation
loss without a validation set) says n/a; a step whose loss was not finite is a gap in its line.
"""
from __future__ import annotations

import argparse
import io
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lit_gpt.checkpoint.publish import write_atomically
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


def load_run(out_dir: Path, name: str | None = None) -> Run:
    path = RunDir(out_dir).metrics_jsonl
    if not out_dir.is_dir():
        raise RunError(f"{out_dir}: no such run directory")
    if not path.is_file():
        raise RunError(f"{path}: no metrics (did the run start?)")
    try:
        records, _ = read_metrics(path, log=lambda message: print(message, file=sys.stderr))
    except ValueError as e:
        raise RunError(str(e)) from None
    train = [r for r in records if "loss" in r]
    if not train:
        raise RunError(f"{path}: no training steps logged")
    val = [r for r in records if "val_loss" in r]
    for record, tokens in zip(val, _tokens_at([r["step"] for r in val], train)):
        record["tokens"] = tokens
    return Run(name or out_dir.name, train, val)


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
    fig = Figure(figsize=(11, 12), layout="constrained")
    grid = fig.subplots(len(PANELS), len(X_AXES), sharex="col")
    axes = {}
    for row, (field, ylabel) in enumerate(PANELS):
        for col, (x_field, xlabel) in enumerate(X_AXES):
            ax = axes[field, x_field] = grid[row][col]
            for i, run in enumerate(runs):
                color = f"C{i % 10}"
                if any(r.get(field) is not None for r in run.train):
                    ax.plot(_values(run.train, x_field), _values(run.train, field), color=color, linewidth=1.2,
                            label=f"{run.name}: train")
                if field == "loss" and run.val:
                    ax.plot(_values(run.val, x_field), _values(run.val, "val_loss"), color=color, linestyle="--",
                            marker="o", markersize=4, label=f"{run.name}: validation")
            if not ax.lines:
                ax.text(0.5, 0.5, f"n/a: no run logged {ylabel}", transform=ax.transAxes, ha="center",
                        va="center", color="gray")
                ax.set_yticks([])  # no scale to read where nothing is drawn
            if field in formatters:
                ax.yaxis.set_major_formatter(formatters[field]())
            if x_field in formatters:
                ax.xaxis.set_major_formatter(formatters[x_field]())
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            if row == len(PANELS) - 1:
                ax.set_xlabel(xlabel)
    for x_field, _ in X_AXES:
        if axes["loss", x_field].lines:
            axes["loss", x_field].legend(fontsize="small")
    fig.suptitle(", ".join(run.name for run in runs))
    return fig, axes


def _names(out_dirs: list[Path]) -> list[str]:
    """Each run's folder name, or the path as given where two runs share a folder name."""
    names = [d.resolve().name for d in out_dirs]
    return names if len(set(names)) == len(names) else [str(d) for d in out_dirs]


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
