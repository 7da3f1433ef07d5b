#!/usr/bin/env bash
# Export a training checkpoint to a verified Hugging Face model directory.
#
#   scripts/create.sh CHECKPOINT OUT_DIR [options of scripts/convert_lit_checkpoint.py]
#
# CHECKPOINT is an iter-XXXXXXXX-ckpt.pth file or sharded directory, ours or one of the original TinyLlama/LLäMmlein
# trainer (its model comes from --model_name or the checkpoint's hparams; give its tokenizer with --tokenizer DIR).
# --verify is on (pass --no-verify to skip it); other options (--dtype fp32, --tokenizer DIR, --model_name NAME,
# --max_shard_size 2GB, --overwrite, ...) are passed through.
set -euo pipefail
if [[ $# -lt 2 || "$1" == -* || "$2" == -* ]]; then
    echo "usage: $0 CHECKPOINT OUT_DIR [--dtype bf16|fp32] [--tokenizer DIR] [--model_name NAME] [--no-verify]" \
         "[...]" >&2
    exit 2
fi
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
checkpoint="$1" out_dir="$2"
shift 2
# $PYTHON, else the checkout's .venv (scripts/setup_env.sh), else python3 (e.g. inside the Apptainer image).
python="${PYTHON:-}"
[ -n "$python" ] || { [ -x "$here/../.venv/bin/python" ] && python="$here/../.venv/bin/python"; } || python=python3
exec "$python" "$here/convert_lit_checkpoint.py" --checkpoint "$checkpoint" --out_dir "$out_dir" --verify "$@"
