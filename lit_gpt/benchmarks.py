"""Benchmark scores of a run's checkpoints (lm-eval tasks), kept beside its metrics: `out_dir/evals/`.

    evals/iter-00001000-ckpt.pth/RECORD.json    one file per scoring of that checkpoint (a job, a command)
    evals/iter-00001000-ckpt.pth.abandoned/     the scores of a checkpoint that a resume set aside
    evals/logs/                                 the Slurm jobs' output

Why not metrics.jsonl: the trainer appends to it and rewrites it on resume, while scoring jobs finish whenever
Slurm runs them. So every record is its own file, written under a hidden name and renamed into place (no lock, no
torn line, nothing to merge with the trainer's writes); readers merge them by step, the newest score of a task
winning.

Records of checkpoints a resume set aside are never shown as the run's: the resume renames the checkpoint's record
directory to `NAME.abandoned` after the checkpoint itself, and a scoring job opens its record directory *before* it
opens the checkpoint and publishes into that open directory (rename relative to its descriptor). A job that scored a
set-aside checkpoint therefore either finds the directory already renamed (it then opens a new one but cannot load the
checkpoint, which is gone from its name) or holds the old directory and its record follows it into `.abandoned`.

Nothing here imports torch.
"""
from __future__ import annotations

import json
import math
import os
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from lit_gpt.checkpoint.publish import set_aside
from lit_gpt.run_dir import ABANDONED, CHECKPOINT_PATTERN, RunDir, checkpoint_step

# The metric a task's curve and summary show: lm-eval's usual headline where a task reports several.
MAIN_METRICS = ("acc_norm", "acc", "exact_match", "f1", "mc2", "mc1", "word_perplexity", "perplexity",
                "bits_per_byte")


def open_record_dir(run_dir: Path, checkpoint_name: str) -> int:
    """A descriptor of the checkpoint's record directory (created if missing), for `publish_record`. Open it before
    loading the checkpoint: see the module docstring."""
    directory = RunDir(run_dir).evals / checkpoint_name
    directory.mkdir(parents=True, exist_ok=True)
    return os.open(directory, os.O_RDONLY | os.O_DIRECTORY)


def publish_record(dir_fd: int, record: dict) -> str:
    """Write `record` into the directory `dir_fd` under a new name, atomically; the file's name."""
    # unique: two scorings of one checkpoint in the same second (same job or not) must not replace each other
    name = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{socket.gethostname()}-{uuid.uuid4().hex[:12]}.json"
    tmp = f".{name}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    finally:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except FileNotFoundError:
            pass
    os.fsync(dir_fd)
    return name


def make_record(step: int, checkpoint: Path, scores: dict[str, dict[str, float]], *, tokens: int | None,
                limit: int | None) -> dict:
    """The record of one scoring: numbers only (lm-eval also reports strings such as "N/A" for a missing stderr)."""
    numeric = {task: {metric: float(value) for metric, value in metrics.items()
                      if isinstance(value, (int, float)) and not isinstance(value, bool)}
               for task, metrics in scores.items()}
    return {"step": step, "checkpoint": Path(checkpoint).name, "tokens": tokens, "limit": limit, "scores": numeric,
            "time": time.time(), "slurm_job_id": os.environ.get("SLURM_JOB_ID")}


def read_benchmarks(run_dir: Path, metrics: list[dict] = (), log: Callable[[str], None] = print) -> list[dict]:
    """The run's scores by step, oldest step first: [{"step", "tokens", "scores": {task: {metric: value}}}], from its
    records under evals/ and the in-training scores among its `metrics` records (keys "eval/TASK/METRIC", see
    lit_gpt.train_tasks). Several scorings of one step are merged task by task, the newest record under evals/
    winning; set-aside (`.abandoned`) ones are left out, an unreadable record is skipped with a warning."""
    found = [(r["step"], -math.inf, None, _in_training_scores(r)) for r in metrics]
    root = RunDir(run_dir).evals
    for directory in root.iterdir() if root.is_dir() else ():
        if not (CHECKPOINT_PATTERN.match(directory.name) and directory.is_dir()):
            continue
        for path in sorted(directory.glob("[!.]*.json")):
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
                if not isinstance(record.get("scores"), dict) or not isinstance(record.get("time"), (int, float)):
                    raise ValueError("no scores")
            except (OSError, ValueError, AttributeError) as e:
                log(f"warning: {path}: not a benchmark record, skipped ({e})")
                continue
            found.append((checkpoint_step(directory), record["time"], record.get("tokens"), record["scores"]))
    by_step: dict[int, dict] = {}
    for step, _, tokens, scores in sorted(found, key=lambda entry: entry[:2]):
        if not scores:
            continue
        merged = by_step.setdefault(step, {"step": step, "tokens": None, "scores": {}})
        merged["scores"].update(scores)
        merged["tokens"] = tokens if tokens is not None else merged["tokens"]
    return list(by_step.values())


def _in_training_scores(record: dict) -> dict[str, dict[str, float]]:
    scores: dict[str, dict[str, float]] = {}
    for key, value in record.items():
        parts = key.split("/", 2)
        if len(parts) == 3 and parts[0] == "eval" and isinstance(value, (int, float)):
            scores.setdefault(parts[1], {})[parts[2]] = value
    return scores


def main_metric(metrics: dict[str, float]) -> tuple[str, float] | None:
    """(name, value) of the metric that stands for the task; lm-eval's ",filter" suffix and stderrs are ignored."""
    plain = _plain(metrics)
    for name in MAIN_METRICS:
        if name in plain:
            return name, plain[name]
    return next(iter(sorted(plain.items())), None)


def _plain(metrics: dict[str, float]) -> dict[str, float]:
    return {name.split(",")[0]: value for name, value in metrics.items() if "stderr" not in name}


def curves(records: list[dict]) -> dict[str, tuple[str, list[tuple[int, int | None, float]]]]:
    """Per task: its main metric (as its newest score names it) and (step, tokens, value) of each step scoring it."""
    metric_of = {}
    for record in records:  # oldest first: the newest decides
        for task, metrics in record["scores"].items():
            if (chosen := main_metric(metrics)) is not None:
                metric_of[task] = chosen[0]
    lines = {}
    for task, metric in sorted(metric_of.items()):
        points = [(r["step"], r["tokens"], value) for r in records
                  if (value := _plain(r["scores"].get(task, {})).get(metric)) is not None]
        lines[task] = (metric, points)
    return lines


def latest_scores(records: list[dict]) -> dict[str, tuple[int, str, float]]:
    """Per task: (step, metric, value) of its newest score."""
    return {task: (points[-1][0], metric, points[-1][2]) for task, (metric, points) in curves(records).items()}


def set_aside_after(run_dir: Path, step: int, log: Callable[[str], None]) -> None:
    """Rename the record directories of checkpoints after `step` to `NAME.abandoned` (kept): a resumed run (or a
    fresh one, `step` 0) trains those steps again, and the scores of the checkpoints it replaced are not its own.
    Call after the checkpoints themselves were set aside."""
    root = RunDir(run_dir).evals
    if not root.is_dir():
        return
    for directory in sorted(root.iterdir()):
        if CHECKPOINT_PATTERN.match(directory.name) and directory.is_dir() and checkpoint_step(directory) > step:
            aside = set_aside(directory, ABANDONED)
            log(f"Set aside the benchmark scores of {directory.name} (after step {step}) as "
                f"{aside.relative_to(RunDir(run_dir).path)}")
