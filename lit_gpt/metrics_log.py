"""The run's metrics records: metrics.jsonl (one JSON object per logged step, appended) and metrics.csv beside it.

Appends are not atomic, so a node crash can leave a torn last line; readers drop it with a warning. A resumed run
replaces the records after its checkpoint's step; the files holding them are set aside whole, never truncated, and
replaced by one rename each (a kill in between is finished by the next start). Records with an "event" key (e.g. a
rollback, see lit_gpt.rollback) are no step's metrics: they go to metrics.jsonl only, never into the CSV's rows.

Benchmark scores that Slurm jobs compute for checkpoints (lm-eval tasks, long after their step) are not written here
(those computed in the training process are: eval/TASK/METRIC fields of the step's record). This file has one
writer, the trainer, which may be appending while a job finishes and rewrites the file on resume. Each scoring is its own file under out_dir/evals/, published atomically (`lit_gpt.benchmarks`); readers
(scripts/plot_run.py, scripts/summarize_run.py) merge them with these records by step. A resume sets the scores of the
checkpoints it abandons aside with them (`NAME.abandoned`), so that they are never shown as the run's.
"""
from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from pathlib import Path

from lit_gpt.checkpoint.layout import SaveError
from lit_gpt.checkpoint.publish import keep_aside, write_atomically
from lit_gpt.errors import InputError
from lit_gpt.run_dir import REPLACED, RunDir


class MetricsLog:
    """metrics.jsonl and metrics.csv in out_dir (rank 0). A resumed run keeps the records up to its checkpoint's step;
    the files with the records it replaces (those after that step, which it trains again) are set aside whole, as
    `metrics.jsonl.replaced` (and `-2`, ...), never truncated. A fresh run sets earlier files aside the same way."""

    COLUMNS = ("iter", "step", "loss", "val_loss", "lr", "grad_norm", "tokens", "tokens_per_sec", "mfu",
               "skipped_steps", "memory_gb", "time")

    def __init__(self, out_dir: Path, resume_step: int | None, enabled: bool, log=print,
                 existing: tuple[list[dict], bool] | None = None, write_csv: bool = True,
                 keep: Callable[[dict], bool] | None = None) -> None:
        """`existing`: what `read_metrics` returned for out_dir, if the caller read it already (to check it before
        changing anything); `write_csv`: keep metrics.csv beside metrics.jsonl; `keep`: which records after
        `resume_step` stay as well."""
        self.jsonl, self.csv = RunDir(out_dir).metrics_jsonl, RunDir(out_dir).metrics_csv
        self.enabled, self.write_csv = enabled, write_csv
        if not enabled:
            return
        records, torn = existing or read_metrics(self.jsonl, log)
        kept = [r for r in records if resume_step is not None and (r["step"] <= resume_step or keep and keep(r))]
        # Each file is kept aside (hard link) and then replaced by one rename, so a kill never loses a record; the
        # CSV is rebuilt from the kept JSONL records whenever it differs, which also finishes a replacement that a
        # kill cut between the two files.
        replaced = [(self.jsonl, "".join(json.dumps(r) + "\n" for r in kept).encode())] \
            if kept != records or torn or not self.jsonl.exists() else []
        if write_csv:
            table = io.StringIO(newline="")
            writer = csv.DictWriter(table, self.COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(r for r in kept if "event" not in r)
            replaced.append((self.csv, table.getvalue().encode()))
        for path, content in replaced:
            if path.exists() and path.read_bytes() == content:
                continue
            if path.exists() and path.stat().st_size and (aside := keep_aside(path, REPLACED)) is not None:
                log(f"Set aside {path.name} (records after step {resume_step or 0}) as {aside.name}")
            write_atomically(path, content)

    def write(self, record: dict) -> None:
        """Append one record; a failed write (a full disk, a file made read-only) is one SaveError naming the file."""
        if not self.enabled:
            return
        path = self.jsonl
        try:
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.write_csv and "event" not in record:
                path = self.csv
                with open(path, "a", newline="") as f:
                    csv.DictWriter(f, self.COLUMNS, extrasaction="ignore").writerow(record)
        except OSError as e:
            raise SaveError(f"{path}: cannot append the metrics record of step {record['step']}: "
                            f"{e.strerror or e}") from None


def read_metrics(path: Path, log=print) -> tuple[list[dict], bool]:
    """The records of metrics.jsonl, and whether a torn last line (a crash mid-append) was dropped."""
    if not path.exists():
        return [], False
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("no step")
        except ValueError:
            if number == len(lines):
                log(f"warning: {path}: dropped a torn last line (the run was killed while writing it)")
                return records, True
            raise InputError(f"{path}: line {number} is not a metrics record (move the file aside)") from None
        records.append(record)
    return records, False


def missing_final_records(records: list[dict], max_steps: int, validated: bool, scored: bool) -> list[str]:
    """What of a run's end is missing from its records: its last step's record, then (with validation data) the final
    validation loss and (with in-training lm-eval tasks) the final task scores. Both are computed after the last
    checkpoint, so a kill can leave a finished run without them; a restart writes only what is missing."""
    finals = [r for r in records if r["step"] == max_steps]
    if not any("loss" in r for r in finals):
        return ["step", "validation", "tasks"]
    return [part for part, wanted, key in (("validation", validated, "val_loss"), ("tasks", scored, "eval/seconds"))
            if wanted and not any(key in r for r in finals)]
