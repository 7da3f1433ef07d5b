"""Time from start to the first batch when resuming at step 1,000,000.

    python bench/bench_resume.py [--files 2000] [--step 1000000]

A fresh Python process opens a dataset of --files chunk files (all headers are checked at open), builds the
StepLoader of rank 3 of 8 at --step with the LLäMmlein 7B batch (1024 samples x 2048 tokens, micro-batch 8) and
takes its first batch. Reported: the data part (dataset open + loader + first batch, what a resume adds) and the
whole process (interpreter and torch import included). For comparison, the replay a TinyLlama-style resume needs
(producing and discarding every earlier batch of the rank), extrapolated from the measured time per step.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_loader import write_chunks  # (bench/ is the script's folder)

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import sys, time
start = time.perf_counter()
from lit_gpt.packed_dataset import PackedDataset, StepLoader
imported = time.perf_counter()
ds = PackedDataset([{data!r}], block_size=2048, seed=42)
loader = StepLoader(ds, global_batch_size=1024, micro_batch_size=8, rank=3, world_size=8, start_step={step})
step, batches = next(iter(loader))
done = time.perf_counter()
assert step == {step} and len(batches) == 16
steps = 20
t = time.perf_counter()
for (_, _), _ in zip(StepLoader(ds, 1024, 8, rank=3, world_size=8, start_step={step}), range(steps)):
    pass
per_step = (time.perf_counter() - t) / steps
print(imported - start, done - imported, per_step, ds.samples_per_epoch)
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--files", type=int, default=2000)
    p.add_argument("--chunk_tokens", type=int, default=2049 * 32)
    p.add_argument("--step", type=int, default=1_000_000)
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        write_chunks(data, args.files, args.chunk_tokens)
        code = PROBE.format(root=str(ROOT), data=str(data), step=args.step)
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        process = time.perf_counter() - start
    import_s, data_s, per_step, samples = (float(x) for x in out.split())
    result = {"chunk_files": args.files, "tokens": args.files * args.chunk_tokens, "samples_per_epoch": int(samples),
              "resume_step": args.step, "position": args.step * 1024,
              "epoch": args.step * 1024 // int(samples), "first_batch_after_start_s": round(data_s, 3),
              "torch_and_module_import_s": round(import_s, 3), "whole_process_s": round(process, 3),
              "replay_estimate_h": round(per_step * args.step / 3600, 1)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
