#!/usr/bin/env bash
# The GPU path on one H100/H200 within 8 minutes, as one command, the main question first:
#   1. mfu_1b       tokens/s, TFLOP/s and MFU of LLaMmlein_1B (bf16-mixed, sequence 2048, one GPU) with the backend
#                   the trainer picks there ("auto": the fastest available), eager, then torch.compile per Block
#   2. attention    forward and forward+backward TFLOP/s of every attention backend (SDPA per CUDA kernel, flex,
#                   FlashAttention where importable), causal and document-masked, 1B and 7B head shapes, 2048 and 8192
#   3. trainer      the trainer on CUDA, a few steps per configuration: FSDP (FULL_SHARD, SHARD_GRAD_OP), FSDP2, DDP,
#                   bf16-mixed and bf16-true, --compile, activation checkpointing, document masking, exact resume
#   4. memory       the --dry_run memory estimate against torch.cuda.max_memory_allocated (120M and 1B, seq 2048)
#   5. mfu_rest     LLaMmlein_120M and the other backends of LLaMmlein_1B, eager and compiled
#   6. kernels      every importable attention backend against an fp32 eager reference (error norms)
# and writes OUT/gpu_check.json and OUT/gpu_check.md (the figures BENCHMARKS.md quotes). Each part has its own time
# limit and writes its figures as it goes, so a part that runs out keeps what it measured and cannot eat the others'
# time. The inductor cache lives in OUT/inductor_cache: a second run into the same OUT on that machine starts warm.
#
#   bash bench/gpu_check.sh [OUT]                # default OUT: gpu_check/
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_QUICK=1 bash bench/gpu_check.sh OUT    # a CPU smoke run (tiny sizes, no compile)
#
# Runs from a plain checkout (it puts the checkout on PYTHONPATH itself; no `pip install -e .`) and needs only:
#   python3 >= 3.11 with torch (CUDA), lightning, numpy, pytest; nothing from the network. Not needed: datatrove,
#   zstandard, wandb, lm-eval, flash-attn (the trainer's data is written by bench/gpu_data.py, and attention
#   backends that are not importable are reported as skipped).
# Pure-Python packages the machine lacks travel as wheels: bench/gpu_check_wheels.txt lists them (one pinned
# requirement a line); fetch them beforehand, where there is a network, into bench/wheels/ (gitignored):
#   pip download --no-deps -d bench/wheels -r bench/gpu_check_wheels.txt
# A listed package that is not importable is installed from there into OUT/site (on PYTHONPATH for every part).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${1:-gpu_check}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
WHEELS_LIST=${GPU_CHECK_WHEELS_LIST:-bench/gpu_check_wheels.txt}
export GPU_CHECK_DEVICE=${GPU_CHECK_DEVICE:-cuda} GPU_CHECK_OUT=$OUT PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=$OUT/inductor_cache
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
QUICK=${GPU_CHECK_QUICK:-0}
started=$(date +%s)
status=0

# Extra pure-Python wheels: installed into OUT/site when the package is not importable.
extras=()
while read -r requirement; do
    requirement=${requirement%%#*}
    requirement=${requirement//[[:space:]]/}
    [ -n "$requirement" ] || continue
    name=${requirement%%==*}
    module=${name//-/_}
    if "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$module') is None)" 2>/dev/null; then
        continue
    fi
    version=${requirement#*==}
    wheel=$(ls bench/wheels/"${module,,}"-"${version}"-*.whl 2>/dev/null | head -n 1)  # wheel names: lower case
    if [ -z "$wheel" ]; then
        echo "error: $WHEELS_LIST: $requirement is not importable and bench/wheels/ has no wheel of it; fetch it first: pip download --no-deps -d bench/wheels -r $WHEELS_LIST" >&2
        exit 2
    fi
    if "$PY" -m pip --version >/dev/null 2>&1; then
        "$PY" -m pip install --quiet --no-index --no-deps --target "$OUT/site" "$wheel" >&2 || exit 2
    else  # no pip: a pure-Python wheel is a zip archive that is importable unpacked
        "$PY" -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" "$wheel" "$OUT/site" || exit 2
    fi
    extras+=("$requirement")
done < <([ -f "$WHEELS_LIST" ] && cat "$WHEELS_LIST")
if [ ${#extras[@]} -gt 0 ]; then
    export PYTHONPATH="$ROOT:$OUT/site${PYTHONPATH#"$ROOT"}"
fi

# The limits are the GPU's; a CPU smoke run (on a shared CI machine) gets four times as long.
LIMIT_SCALE=1
[ "$GPU_CHECK_DEVICE" = cuda ] || LIMIT_SCALE=4
part() {  # part NAME SECONDS COMMAND...: run with a time limit, log to OUT/NAME.log, remember failures
    local name=$1 limit=$(( $2 * LIMIT_SCALE ))
    shift 2
    echo "== $name (limit ${limit}s)"
    local t0
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "{\"rc\": $rc, \"seconds\": $(( $(date +%s) - t0 )), \"limit\": $limit}" > "$OUT/$name.status.json"
    [ "$rc" -eq 0 ] || { echo "!! $name failed (rc=$rc)"; status=1; }
}

"$PY" - "${extras[@]}" <<'EOF' | tee "$OUT/environment.log"
import platform, sys, torch
import lit_gpt
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), python {platform.python_version()}")
print(f"lit_gpt from {lit_gpt.__file__}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}")
for requirement in sys.argv[1:]:
    name = requirement.split("==")[0]
    module = __import__(name.replace("-", "_"))
    print(f"extra wheel: {name} {getattr(module, '__version__', '?')} from {module.__file__}")
EOF
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "error: the environment check failed (above)" >&2; exit 2; }

MFU=("$PY" bench/train_cpu.py --device "$GPU_CHECK_DEVICE" --mfu)
if [ "$QUICK" = 1 ]; then  # the smallest size, and no cold compile (a CPU smoke run of the script itself)
    MFU_1B=(--models micro --gpu_seq_len 128 --gpu_batch 2 --gpu_warmup 1 --gpu_steps 2 --backends auto)
    ATTENTION=(--quick --min_seconds 0.02 --max_iters 2)
    TRAINER_TESTS=(-k "full_shard or resume")
else
    MFU_1B=(--models LLaMmlein_1B --gpu_seq_len 2048 --backends auto)
    ATTENTION=()
    TRAINER_TESTS=()
fi
# Limits add up to 460 s: with the environment check and the summary, within 8 minutes.
part mfu_1b_eager 55 "${MFU[@]}" "${MFU_1B[@]}" --json_out "$OUT/mfu_1b_eager.json"
if [ "$QUICK" != 1 ]; then
    part mfu_1b_compile 95 "${MFU[@]}" --compile "${MFU_1B[@]}" --json_out "$OUT/mfu_1b_compile.json"
fi
part attention_bench 65 "$PY" bench/bench_attention.py --device "$GPU_CHECK_DEVICE" "${ATTENTION[@]}" \
    --json_out "$OUT/attention_bench.json"
part trainer 150 "$PY" -m pytest -q -p no:cacheprovider tests/gpu/test_trainer_gpu.py --junitxml="$OUT/trainer.xml" \
    ${TRAINER_TESTS[@]+"${TRAINER_TESTS[@]}"}
part memory 40 "$PY" -m pytest -q -p no:cacheprovider tests/gpu/test_memory_gpu.py --junitxml="$OUT/memory.xml"
if [ "$QUICK" != 1 ]; then
    part mfu_rest 30 "${MFU[@]}" --models LLaMmlein_120M,LLaMmlein_1B --gpu_seq_len 2048 --backends sdpa,flex,fa4,fa2 \
        --json_out "$OUT/mfu_rest.json"
fi
if [ "$GPU_CHECK_DEVICE" = cuda ]; then  # the kernels' error norms: nothing to compare on a CPU
    part attention 25 "$PY" -m pytest -q -p no:cacheprovider tests/gpu/test_attention_gpu.py \
        --junitxml="$OUT/attention.xml"
fi

"$PY" bench/gpu_summary.py "$OUT" --seconds $(( $(date +%s) - started )) || status=1
exit $status
