#!/usr/bin/env bash
# Every CPU benchmark of BENCHMARKS.md, one after the other (never in parallel: they time the same cores).
# Output: out/bench/<name>.log. Needs .venv (scripts/setup_env.sh) and .venv-bench (bench/setup_env.sh).
#
#   bash bench/run_all.sh            # about 45 minutes on 2 cores
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p out/bench
run() {
    local name=$1
    shift
    echo "== $name: $*"
    "$@" 2>&1 | tee "out/bench/$name.log" | grep -v "^  " | tail -n 25
}
run loader .venv-bench/bin/python bench/bench_loader.py
run resume .venv/bin/python bench/bench_resume.py
run prepare .venv/bin/python bench/bench_prepare.py
run export .venv/bin/python bench/bench_export.py --model_name LLaMmlein_1B --repeats 5
run verify .venv/bin/python bench/bench_verify.py --model_name LLaMmlein_1B
run train_cpu_fp32 .venv/bin/python bench/train_cpu.py --rounds 5 --contenders ours,litgpt,hf,ours_compile --steps 10 --warmup 3
run train_cpu_bf16 .venv/bin/python bench/train_cpu.py --rounds 5 --precision bf16-mixed
run async_checkpoint_fsdp1 .venv/bin/python bench/bench_async_checkpoint.py --fsdp 1
run async_checkpoint_fsdp2 .venv/bin/python bench/bench_async_checkpoint.py --fsdp 2
run eval_overhead .venv/bin/python bench/bench_eval_overhead.py --steps 250 --interval 100
