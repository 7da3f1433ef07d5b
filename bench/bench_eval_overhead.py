"""What --eval_tasks costs the demo run: the demo's training (scripts/demo.sh: demo_5M on fortunes-de, batch 16 x 256
tokens, one CPU process, validation every 100 steps) with and without lm-eval tasks every --eval_task_interval
steps (and at the end), side by side.

    python bench/bench_eval_overhead.py                          # 100 steps, llammlein_de every 50 steps
    python bench/bench_eval_overhead.py --steps 250 --interval 100 --tasks llammlein_de,llammlein_de_gen

Reported: each run's wall time (the trainer process, start-up included), the seconds the trainer itself reports
for its task runs (eval/seconds in metrics.jsonl), and the overhead in % of the training time: the task seconds
against the rest of the same run, and (noisier on a shared machine) the difference of the two runs' wall times. The corpus, tokenizer and packed data are built
as demo.sh builds them, once, in --work (reused when present).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lit_gpt.metrics_log import read_metrics
from lit_gpt.run_dir import RunDir

ROOT = Path(__file__).resolve().parents[1]
FORTUNES_DE = Path("/usr/share/games/fortunes/de")


def run(*args: str) -> float:
    """Seconds the command took; its output is shown only when it fails."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{args[0]} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def prepare(work: Path, corpus_dir: Path) -> None:
    """demo.sh steps 1-3: corpus, tokenizer (4096 tokens), packed data with a 5% validation split."""
    corpus = work / "corpus.jsonl"
    if not corpus.exists():
        run("scripts/fortunes_to_jsonl.py", "--src", str(corpus_dir), "--out", str(corpus))
    if not (work / "tokenizer" / "tokenizer.model").exists():
        run("scripts/train_tokenizer.py", "--input", str(corpus), "--output_dir", str(work / "tokenizer"),
            "--vocab_size", "4096")
    if not (work / "data" / "train").is_dir():
        run("scripts/prepare_data.py", "--input", str(corpus), "--output_dir", str(work / "data"), "--tokenizer",
            str(work / "tokenizer"), "--val_fraction", "0.05", "--chunk_size", "262144")


def train(work: Path, out: Path, steps: int, extra: list[str]) -> dict:
    """demo.sh step 4 with `steps` steps: (wall seconds, the trainer's reported task seconds, last loss)."""
    seconds = run("pretrain/tinyllama_fabric.py", "--model_name", "demo_5M", "--out_dir", str(out),
                  "--train_data_dir", str(work / "data" / "train"), "--val_data_dir", str(work / "data" / "val"),
                  "--tokenizer_path", str(work / "tokenizer"), "--accelerator", "cpu", "--devices", "1",
                  "--strategy", "auto", "--precision", "32-true", "--global_batch_size", "16",
                  "--micro_batch_size", "16", "--max_steps", str(steps), "--learning_rate", "3e-3", "--min_lr",
                  "3e-4", "--warmup_steps", "20", "--log_interval", "10", "--eval_interval", "100", "--eval_iters",
                  "10", "--save_interval", str(steps), "--num_workers", "1", "--logger", "csv", *extra)
    records, _ = read_metrics(RunDir(out).metrics_jsonl)
    task_seconds = sum(r.get("eval/seconds", 0.0) for r in records)
    losses = [r["loss"] for r in records if "loss" in r]
    return {"wall_s": seconds, "task_s": task_seconds, "task_runs": sum("eval/seconds" in r for r in records),
            "last_loss": losses[-1]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=100, help="optimizer steps of each run (demo.sh: 250)")
    p.add_argument("--interval", type=int, default=50, help="--eval_task_interval of the run with tasks")
    p.add_argument("--tasks", default="llammlein_de", help="--eval_tasks of the run with tasks")
    p.add_argument("--limit", type=int, default=0, help="--eval_limit (0: every item)")
    p.add_argument("--corpus", type=Path, default=FORTUNES_DE, help="demo.sh's corpus folder")
    p.add_argument("--work", type=Path, help="where the data and runs go (default: a temporary folder)")
    args = p.parse_args(argv)

    work = args.work or Path(tempfile.mkdtemp(prefix="bench_eval_overhead_"))
    work.mkdir(parents=True, exist_ok=True)
    prepare(work, args.corpus)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    without = train(work, work / f"without-{stamp}", args.steps, [])
    with_tasks = train(work, work / f"with-{stamp}", args.steps,
                       ["--eval_tasks", args.tasks, "--eval_task_interval", str(args.interval),
                        "--eval_limit", str(args.limit)])
    assert with_tasks["last_loss"] == without["last_loss"], "the tasks changed the training"
    # The task seconds against the rest of the same run: on a shared machine the load drifts between two runs more
    # than the tasks cost, so the wall-time difference is the noisier figure.
    by_reported = 100 * with_tasks["task_s"] / (with_tasks["wall_s"] - with_tasks["task_s"])
    by_wall = 100 * (with_tasks["wall_s"] - without["wall_s"]) / without["wall_s"]
    print(f"demo_5M, {args.steps} steps, --eval_tasks {args.tasks} --eval_task_interval {args.interval}"
          f"{f' --eval_limit {args.limit}' if args.limit else ''} ({with_tasks['task_runs']} task runs)")
    print("| run | wall time (s) | task time reported (s) |\n|---|---:|---:|")
    print(f"| without tasks | {without['wall_s']:.1f} | - |")
    print(f"| with tasks | {with_tasks['wall_s']:.1f} | {with_tasks['task_s']:.1f} |")
    print(f"overhead: {by_reported:.1f}% of the training time (the task seconds against the rest of that run); "
          f"{by_wall:+.1f}% by the wall-time difference of the two runs; the same final loss "
          f"{without['last_loss']:.4f} in both runs")


if __name__ == "__main__":
    main()
