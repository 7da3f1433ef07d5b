"""Summarise a bench/gpu_check.sh output folder into gpu_check.json and gpu_check.md.

    python bench/gpu_summary.py OUT [--seconds N]

Reads the parts' status files, the pytest JUnit reports, the figures the GPU tests recorded (attention_gpu.json,
trainer.json, memory.json), the MFU tables (mfu_1b_eager.json, mfu_1b_compile.json, mfu_rest.json) and the attention
microbenchmark (attention_bench.json). Exits 1 when a part failed or a test failed.
"""
from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

PARTS = ("mfu_1b_eager", "mfu_1b_compile", "attention_bench", "trainer", "memory", "mfu_rest", "attention")
MFU_PARTS = {"mfu_1b_eager": "LLaMmlein_1B, eager", "mfu_1b_compile": "LLaMmlein_1B, torch.compile per Block",
             "mfu_rest": "the other models and backends, eager"}


def _json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def test_outcomes(report: Path) -> dict[str, str]:
    """test name -> passed / failed / skipped (reason) from a JUnit XML report."""
    if not report.is_file():
        return {}
    outcomes = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed: " + (child.get("message") or "")[:200]
            elif child.tag == "skipped":
                outcome = "skipped: " + (child.get("message") or "")[:200]
        outcomes[case.get("name")] = outcome
    return outcomes


def collect(out: Path, seconds: int) -> dict:
    env = (out / "environment.log").read_text().strip() if (out / "environment.log").is_file() else ""
    summary = {"environment": env, "seconds": seconds, "parts": {}, "tests": {}}
    for part in PARTS:
        summary["parts"][part] = _json(out / f"{part}.status.json") or {"rc": None, "seconds": None}
    for part in ("attention", "trainer", "memory"):
        summary["tests"][part] = test_outcomes(out / f"{part}.xml")
    summary["attention"] = _json(out / "attention_gpu.json") or {}  # written by tests/gpu/test_attention_gpu.py
    summary["trainer"] = _json(out / "trainer.json") or {}  # written by tests/gpu/test_trainer_gpu.py
    summary["memory"] = _json(out / "memory.json") or {}  # written by tests/gpu/test_memory_gpu.py
    for part in MFU_PARTS:
        table = _json(out / f"{part}.json") or {}
        summary[part] = table.get("rows", [])
        for key in ("device", "torch", "peak_tflops", "mfu_convention"):
            if table.get(key) is not None:
                summary.setdefault("mfu_setup", {})[key] = table[key]
    summary["attention_bench"] = _json(out / "attention_bench.json") or {}
    return summary


def markdown(s: dict) -> str:
    lines = ["# GPU check", "", "```", s["environment"], "```", "",
             f"Total {s['seconds']} s. Parts: " + ", ".join(
                 f"{name} {'ok' if p['rc'] == 0 else 'FAILED' if p['rc'] is not None else 'not run'}"
                 + (f" ({p['seconds']} s)" if p.get("seconds") is not None else "") for name, p in s["parts"].items()),
             ""]
    for part, outcomes in s["tests"].items():
        failed = {k: v for k, v in outcomes.items() if v.startswith("failed")}
        lines.append(f"{part} tests: {sum(v == 'passed' for v in outcomes.values())} passed, {len(failed)} failed, "
                     f"{sum(v.startswith('skipped') for v in outcomes.values())} skipped")
        lines += [f"- {k}: {v}" for k, v in failed.items()]
    attention = s["attention"]
    if attention:
        lines += ["", "## Attention backends vs an fp32 eager reference (bf16; worst case over layouts and masks)", "",
                  f"auto picks: {attention.get('auto', {})}", "", "| backend | measure | value |", "|---|---|---:|"]
        for backend, worst in attention.get("max_by_backend", {}).items():
            lines += [f"| {backend} | {name} | {_fmt(value, '.2e')} |" for name, value in worst.items()]
        lines += [f"| {backend} | skipped | {reason} |" for backend, reason in attention.get("skipped", {}).items()]
    if s["trainer"]:
        lines += ["", "## Trainer on CUDA (20 steps each; loss difference to the single-device bf16-mixed run)", "",
                  "| run | max loss diff | final loss | tokens/s | seconds |", "|---|---:|---:|---:|---:|"]
        for name, r in s["trainer"].items():
            lines.append(f"| {name} | {_fmt(r.get('max_loss_diff'), '.2e')} | {_fmt(r.get('final_loss'), '.4f')} | "
                         f"{_fmt(r.get('tokens_per_sec'), ',.0f')} | {_fmt(r.get('seconds'), '.0f')} |")
    if s["memory"]:
        lines += ["", "## Memory: the --dry_run estimate against the measured peak (bf16-mixed, one GPU)", "",
                  "| model | micro batch x seq | estimate GiB | measured GiB | estimate / measured | reserved GiB | "
                  "device used GiB |", "|---|---|---:|---:|---:|---:|---:|"]
        for name, r in s["memory"].items():
            lines.append(f"| {name} | {r['micro_batch_size']} x {r['seq_len']} | {r['estimate_gib']:.2f} | "
                         f"{r['measured_gib']:.2f} | {r['ratio']:.3f} | {_fmt(r.get('reserved_gib'), '.2f')} | "
                         f"{_fmt(r.get('device_used_gib'), '.2f')} |")
    setup = s.get("mfu_setup", {})
    if setup:
        peak = setup.get("peak_tflops")
        peak_text = f"{peak:.0f} TFLOP/s" if peak else "unknown here: MFU n/a"
        lines += ["", f"MFU on {setup.get('device')} (torch {setup.get('torch')}): tokens/s x FLOPs per token "
                  f"({setup.get('mfu_convention')}) / the device's peak dense bf16 FLOP/s "
                  f"({peak_text})."]
    for part, title in MFU_PARTS.items():
        rows = s[part]
        if not rows:
            continue
        lines += ["", f"## Throughput and MFU ({title})", "",
                  "| model | attention | micro batch x seq | tokens/s | TFLOP/s | MFU | peak GiB |",
                  "|---|---|---|---:|---:|---:|---:|"]
        for r in rows:
            if "skipped" in r:
                lines.append(f"| {r['model']} | {r['attn']} | | skipped: {r['skipped']} | | | |")
            else:
                lines.append(f"| {r['model']} | {r['attn']} | {r['batch']} x {r['seq_len']} | "
                             f"{r['tokens_per_sec']:,.0f} | {r['tflops']:.1f} | {_fmt(r['mfu'], '.1%')} | "
                             f"{_fmt(r['memory_gb'], '.1f')} |")
    lines += attention_bench_lines(s["attention_bench"])
    return "\n".join(lines) + "\n"


def attention_bench_lines(bench: dict) -> list[str]:
    if not bench.get("rows"):
        return []
    lines = ["", f"## Attention kernels alone ({bench['device']}, {bench['dtype']}, torch {bench['torch']})", "",
             f"TFLOP/s count {bench['flop_convention']}.", "",
             "| model heads (q/kv x D) | seq | mask | backend | forward TFLOP/s | fwd+bwd TFLOP/s | fwd+bwd ms |",
             "|---|---:|---|---|---:|---:|---:|"]
    skipped = {}
    for r in bench["rows"]:
        if "skipped" in r:
            skipped.setdefault(r["backend"], r["skipped"])
            continue
        lines.append(f"| {r['model']} {r['heads']} | {r['seq_len']} | {r['mask']} | {r['backend']} | "
                     f"{r['forward_tflops']:.3g} | {r['fwd_bwd_tflops']:.3g} | {r['fwd_bwd_ms']:.2f} |")
    lines += [f"- {backend} skipped (first reason): {reason}" for backend, reason in skipped.items()]
    return lines


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--seconds", type=int, default=0)
    args = p.parse_args()
    summary = collect(args.out, args.seconds)
    (args.out / "gpu_check.json").write_text(json.dumps(summary, indent=1))
    text = markdown(summary)
    (args.out / "gpu_check.md").write_text(text)
    print(text)
    failed = any(p["rc"] not in (0, None) for p in summary["parts"].values()) or any(
        v.startswith("failed") for outcomes in summary["tests"].values() for v in outcomes.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
