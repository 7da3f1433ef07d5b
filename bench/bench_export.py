"""Benchmark the Hugging Face export: time and peak memory vs writing the same bytes with safetensors alone.

    python bench/bench_export.py --model_name LLaMmlein_1B --ckpt_dtype fp32

Steps, each in its own process (peak RSS is read per process with os.wait4, so they do not mix):
1. make: random weights for the model, saved as a full training checkpoint (+ a small tokenizer beside it);
2. baseline: the exported tensors (HF names, export dtype) built in memory, then timed `safetensors.torch.save_file`
   (+ fsync, since the export makes its files durable too);
3. export: `scripts/convert_lit_checkpoint.py` main() timed in-process (interpreter start excluded, as for the
   baseline); peak RSS of the whole export process.
Steps 2 and 3 alternate --repeats times; the ratios compare best with best and median with median.
"Weights' size" is reported two ways: the checkpoint's model tensors (in --ckpt_dtype) and the exported tensors.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lit_gpt.run_dir import RunDir

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name", default="LLaMmlein_1B")
    p.add_argument("--ckpt_dtype", choices=["fp32", "bf16"], default="fp32", help="dtype of the checkpoint's weights")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="export dtype")
    p.add_argument("--repeats", type=int, default=3, help="baseline/export pairs, run alternately")
    p.add_argument("--workdir", type=Path, help="where to write (default: a temp dir, removed afterwards)")
    p.add_argument("--step", choices=["make", "baseline", "export"], help=argparse.SUPPRESS)  # internal
    return p.parse_args(argv)


# ------------------------------------------------------------------ steps (run in child processes)
def make_checkpoint(args: argparse.Namespace, work: Path) -> dict:
    import torch

    from lit_gpt.config import Config
    from lit_gpt.hf_convert import TORCH_DTYPES
    from lit_gpt.model import GPT

    config = Config.from_name(args.model_name)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(config)
    model = model.to_empty(device="cpu").to(TORCH_DTYPES[args.ckpt_dtype])
    model.init_weights()
    run = work / "run"
    RunDir(run).model_config.write_text(json.dumps(config.to_dict()))
    state = model.state_dict()
    torch.save({"model": state, "config": config.to_dict(), "step_count": 0, "iter_num": 0, "tokens_seen": 0,
                "hparams": {"benchmark": True}}, RunDir(run).checkpoint(0))
    return {"checkpoint_model_bytes": sum(t.nbytes for t in state.values()),
            "parameters": sum(t.numel() for t in state.values())}


def baseline(args: argparse.Namespace, work: Path) -> dict:
    from safetensors.torch import save_file

    from lit_gpt.checkpoint.load import load_weights, resolve_config
    from lit_gpt.hf_convert import TORCH_DTYPES, lit_to_hf

    path = RunDir(work / "run").checkpoint(0)
    ckpt = load_weights(path)
    config = resolve_config(ckpt, path)
    dtype = TORCH_DTYPES[args.dtype]
    tensors = {}
    for key in ckpt["model"]:  # as the export converts, so that both write with the same memory in use
        tensors.update({n: t.contiguous() for n, t in lit_to_hf(config, key, ckpt["model"].as_dtype(key, dtype)).items()})
        ckpt["model"].release(key)
    target = work / "baseline.safetensors"
    start = time.perf_counter()
    save_file(tensors, target, metadata={"format": "pt"})
    written = time.perf_counter()
    with open(target, "rb") as f:
        os.fsync(f.fileno())
    done = time.perf_counter()
    target.unlink()
    return {"save_file_s": written - start, "save_file_fsync_s": done - start,
            "export_bytes": sum(t.nbytes for t in tensors.values())}


def export(args: argparse.Namespace, work: Path) -> dict:
    from scripts.convert_lit_checkpoint import main

    argv = ["--checkpoint", str(RunDir(work / "run").checkpoint(0)), "--out_dir", str(work / "hf"),
            "--dtype", args.dtype, "--overwrite", "--no-verify"]
    start = time.perf_counter()
    if main(argv) != 0:
        raise SystemExit("export failed")
    return {"export_s": time.perf_counter() - start}


# ------------------------------------------------------------------ driver
def run_step(args: argparse.Namespace, step: str, work: Path) -> dict:
    """Run one step in a fresh interpreter; returns its JSON result plus wall time and peak RSS."""
    cmd = [sys.executable, __file__, "--step", step, "--workdir", str(work), "--model_name", args.model_name,
           "--ckpt_dtype", args.ckpt_dtype, "--dtype", args.dtype]
    out, err = work / f"{step}.out", work / f"{step}.err"
    start = time.perf_counter()
    with open(out, "w") as fo, open(err, "w") as fe:
        proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"step {step} failed:\n{err.read_text()[-3000:]}")
    result = json.loads(out.read_text().strip().splitlines()[-1])
    return {**result, "process_s": wall, "peak_rss_bytes": usage.ru_maxrss * 1024}


def write_tokenizer(work: Path) -> None:
    """A small German BPE tokenizer (the model's own vocabulary size does not matter for export speed)."""
    words = "der die das und ist nicht Haus Baum Straße Wasser Mädchen Größe schön grün über fünf Brücke König".split()
    rng = random.Random(0)
    corpus = work / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(3000)), encoding="utf-8")
    subprocess.run([sys.executable, "scripts/train_tokenizer.py", "--input", str(corpus), "--output_dir",
                    str(RunDir(work / "run").tokenizer), "--vocab_size", "400", "--num_threads", "1"],
                   cwd=ROOT, check=True, capture_output=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.step:
        step = {"make": make_checkpoint, "baseline": baseline, "export": export}[args.step]
        print(json.dumps(step(args, args.workdir)))
        return 0
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_export_"))
    try:
        (work / "run").mkdir(parents=True, exist_ok=True)
        write_tokenizer(work)
        made = run_step(args, "make", work)
        bases, exports = [], []
        for _ in range(args.repeats):  # alternate, so that load from other users affects both alike
            bases.append(run_step(args, "baseline", work))
            shutil.rmtree(work / "hf", ignore_errors=True)  # each export writes a fresh directory
            exports.append(run_step(args, "export", work))
        base_s = [r["save_file_fsync_s"] for r in bases]
        export_s = [r["export_s"] for r in exports]
        peak = max(r["peak_rss_bytes"] for r in exports)
        export_bytes = bases[0]["export_bytes"]
        gb = 1e9
        report = {
            "model": args.model_name, "parameters": made["parameters"],
            "checkpoint": f"{args.ckpt_dtype}, model tensors {made['checkpoint_model_bytes'] / gb:.2f} GB",
            "export": f"{args.dtype}, {export_bytes / gb:.2f} GB",
            "save_file_s": [round(r["save_file_s"], 2) for r in bases],
            "save_file_fsync_s": [round(x, 2) for x in base_s],
            "export_s": [round(x, 2) for x in export_s],
            "export_process_s": [round(r["process_s"], 2) for r in exports],
            "time_ratio_best": round(min(export_s) / min(base_s), 2),
            "time_ratio_median": round(statistics.median(export_s) / statistics.median(base_s), 2),
            "export_peak_rss_GB": round(peak / gb, 2),
            "baseline_peak_rss_GB": round(max(r["peak_rss_bytes"] for r in bases) / gb, 2),
            "rss_ratio_vs_export_weights": round(peak / export_bytes, 2),
            "rss_ratio_vs_checkpoint_weights": round(peak / made["checkpoint_model_bytes"], 2),
        }
        print(json.dumps(report, indent=2))
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
