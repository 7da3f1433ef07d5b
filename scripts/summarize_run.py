"""Summarise a run's metrics.jsonl: first/last training loss, validation losses, throughput, the ranks named as
stragglers (most often first), and the newest benchmark score of each task (scored in training or by jobs on its
checkpoints). With --expect_falling, exit 1 unless both training and validation loss fell."""
import argparse
import sys
from pathlib import Path

from lit_gpt.benchmarks import latest_scores, read_benchmarks
from lit_gpt.errors import InputError
from lit_gpt.metrics_log import read_metrics
from lit_gpt.run_dir import RunDir
from lit_gpt.stragglers import slowest_nodes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--expect_falling", action="store_true")
    args = parser.parse_args()
    path = RunDir(args.out_dir).metrics_jsonl
    if not path.is_file():
        print(f"error: {path}: no metrics (did the run start?)", file=sys.stderr)
        return 2
    try:
        records, _ = read_metrics(path, log=lambda message: print(message, file=sys.stderr))
    except InputError as e:  # a line that is not a metrics record
        print(f"error: {e}", file=sys.stderr)
        return 2
    train = [r for r in records if r.get("loss") is not None]
    val = [r for r in records if "val_loss" in r]
    if not train:
        print(f"error: {path}: no training steps logged", file=sys.stderr)
        return 2
    first, last = train[0], train[-1]
    print(f"train loss: step {first['step']}: {first['loss']:.3f} -> step {last['step']}: {last['loss']:.3f}")
    for r in val:
        print(f"val loss at step {r['step']}: {r['val_loss']:.3f}")
    speeds = [r["tokens_per_sec"] for r in train if r.get("tokens_per_sec")]
    if speeds:
        print(f"throughput: {sum(speeds) / len(speeds):,.0f} tokens/s; tokens seen: {last['tokens']:,}")
    slowest, intervals = slowest_nodes(r.get("stragglers", []) for r in train)
    print("stragglers: " + ("; ".join(slowest) if slowest else f"none in {intervals} logged steps"))
    benchmarks = read_benchmarks(args.out_dir, records, log=lambda message: print(message, file=sys.stderr))
    for task, (step, metric, value) in latest_scores(benchmarks).items():
        print(f"{task}: {metric} {value:.4f} at step {step}")
    if args.expect_falling:
        train_fell = last["loss"] < first["loss"]
        val_fell = len(val) >= 2 and val[-1]["val_loss"] < val[0]["val_loss"]
        if not (train_fell and val_fell):
            print(f"error: loss did not fall (train: {train_fell}, validation: {val_fell})", file=sys.stderr)
            return 1
        print("OK: training and validation loss fell")
    return 0


if __name__ == "__main__":
    sys.exit(main())
