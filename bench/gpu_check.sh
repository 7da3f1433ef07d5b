#!/usr/bin/env bash
# The GPU path on one H100/H200 in about 8 minutes, as one command:
#   1. every importable attention backend against an fp32 eager reference (forward, backward, bf16, GQA, documents)
#   2. the trainer on CUDA, 20 steps per configuration: FSDP (FULL_SHARD, SHARD_GRAD_OP), FSDP2, DDP, bf16-mixed and
#      bf16-true, --compile, activation checkpointing, document masking, and a resume that continues the same losses
#   3. the --dry_run memory estimate against torch.cuda.max_memory_allocated (LLaMmlein_120M and 1B, sequence 2048)
#   4. tokens/s, TFLOP/s, MFU and peak memory of LLaMmlein_120M and LLaMmlein_1B at sequence 2048 per attention
#      backend, compile off and on
# and writes OUT/gpu_check.json and OUT/gpu_check.md (the figures BENCHMARKS.md quotes).
#
#   bash bench/gpu_check.sh [OUT]                # default OUT: gpu_check/
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_QUICK=1 bash bench/gpu_check.sh OUT    # a CPU smoke run (no kernels, no compile)
#
# Needs only torch (CUDA), lightning, transformers, sentencepiece, tokenizers, pyyaml, numpy, zstandard, pytest and
# jsonargparse: no network. jsonargparse (the trainer's flags) is pure Python: where it is not installed, carry its
# wheel (178 KB; `pip download jsonargparse==4.53.0 --no-deps -d shared/wheels`) and it is imported from the wheel.
# Each part has its own time limit, so a slow part cannot eat the others' time.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check}
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
export GPU_CHECK_DEVICE=${GPU_CHECK_DEVICE:-cuda} GPU_CHECK_OUT=$OUT PYTHONUNBUFFERED=1
QUICK=${GPU_CHECK_QUICK:-0}
if ! "$PY" -c "import jsonargparse" 2>/dev/null; then  # a wheel of pure Python imports as it is (zipimport)
    for wheel in shared/wheels/jsonargparse-*.whl; do
        [ -e "$wheel" ] && export PYTHONPATH="$PWD/$wheel${PYTHONPATH:+:$PYTHONPATH}"
    done
    "$PY" -c "import jsonargparse" || {
        echo "error: jsonargparse is not installed and shared/wheels/ holds no wheel of it (see the header)" >&2
        exit 2
    }
fi
mkdir -p "$OUT"
started=$(date +%s)
status=0

part() {  # part NAME SECONDS COMMAND...: run with a time limit, log to OUT/NAME.log, remember failures
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    local t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "{\"rc\": $rc, \"seconds\": $(( $(date +%s) - t0 ))}" > "$OUT/$name.status.json"
    [ "$rc" -eq 0 ] || { echo "!! $name failed (rc=$rc)"; status=1; }
}

"$PY" - <<'EOF' | tee "$OUT/environment.log"
import platform, torch
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), python {platform.python_version()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}")
EOF

if [ "$QUICK" = 1 ]; then  # the smallest size, and no cold compile (a CPU smoke run of the script itself)
    MFU_ARGS=(--models micro --gpu_seq_len 128 --gpu_batch 2 --gpu_warmup 1 --gpu_steps 2 --backends sdpa)
    TRAINER_TESTS=(-k "full_shard or resume")
else
    MFU_ARGS=(--models LLaMmlein_120M,LLaMmlein_1B --gpu_seq_len 2048)
    TRAINER_TESTS=()
fi
# Limits add up to 8 minutes; a part that runs out keeps the figures it wrote so far.
if [ "$GPU_CHECK_DEVICE" = cuda ]; then  # the kernels themselves: nothing to run on a CPU
    part attention 60 "$PY" -m pytest -q -p no:cacheprovider tests/gpu/test_attention_gpu.py \
        --junitxml="$OUT/attention.xml"
fi
part trainer 200 "$PY" -m pytest -q -p no:cacheprovider tests/gpu/test_trainer_gpu.py --junitxml="$OUT/trainer.xml" \
    ${TRAINER_TESTS[@]+"${TRAINER_TESTS[@]}"}
part memory 40 "$PY" -m pytest -q -p no:cacheprovider tests/gpu/test_memory_gpu.py --junitxml="$OUT/memory.xml"
part mfu_eager 100 "$PY" bench/train_cpu.py --device "$GPU_CHECK_DEVICE" --mfu "${MFU_ARGS[@]}" \
    --json_out "$OUT/mfu_eager.json"
if [ "$QUICK" != 1 ]; then
    part mfu_compile 80 "$PY" bench/train_cpu.py --device "$GPU_CHECK_DEVICE" --mfu --compile "${MFU_ARGS[@]}" \
        --backends flex,sdpa,fa3,fa4,fa2 --json_out "$OUT/mfu_compile.json"
fi

"$PY" bench/gpu_summary.py "$OUT" --seconds $(( $(date +%s) - started )) || status=1
exit $status
