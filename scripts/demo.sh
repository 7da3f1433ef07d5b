#!/usr/bin/env bash
# The main job, end to end on CPU: corpus -> tokenizer -> packed data -> training (TensorBoard, checkpoint)
# -> loss report and plot -> Hugging Face export (verified against transformers) -> a generated German sample.
#
#   bash scripts/demo.sh [CORPUS_DIR]
#
# CORPUS_DIR defaults to Debian's fortunes-de (installed when missing); any folder of .txt/.jsonl files works.
# Everything lands in $DEMO_DIR (default: demo/). Re-running resumes/skips finished work.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
PY=.venv/bin/python
DEMO_DIR=${DEMO_DIR:-demo}
CORPUS_DIR=${1:-/usr/share/games/fortunes/de}
MODEL=${DEMO_MODEL:-demo_5M}
STEPS=${DEMO_STEPS:-250}
mkdir -p "$DEMO_DIR"

echo "== 1/6 corpus from $CORPUS_DIR"
mapfile -t inputs < <(find "$CORPUS_DIR" -maxdepth 1 -type f \( -name '*.txt' -o -name '*.jsonl' -o -name '*.jsonl.zst' -o -name '*.parquet' \) | sort)
if [ ${#inputs[@]} -eq 0 ]; then
    [ -f "$DEMO_DIR/corpus.jsonl" ] || $PY scripts/fortunes_to_jsonl.py --src "$CORPUS_DIR" --out "$DEMO_DIR/corpus.jsonl"
    inputs=("$DEMO_DIR/corpus.jsonl")
fi

echo "== 2/6 tokenizer (SentencePiece BPE, 4096 tokens)"
[ -f "$DEMO_DIR/tokenizer/tokenizer.model" ] || \
    $PY scripts/train_tokenizer.py --input "${inputs[@]}" --output_dir "$DEMO_DIR/tokenizer" --vocab_size 4096

echo "== 3/6 packed dataset (datatrove's task log: $DEMO_DIR/prepare_data.log)"
if ! $PY scripts/prepare_data.py --input "${inputs[@]}" --output_dir "$DEMO_DIR/data" --tokenizer "$DEMO_DIR/tokenizer" \
    --val_fraction 0.05 --chunk_size 262144 2>"$DEMO_DIR/prepare_data.log"; then
    tail -n 20 "$DEMO_DIR/prepare_data.log" >&2
    exit 1
fi

echo "== 4/6 training $MODEL for $STEPS steps on CPU (TensorBoard: tensorboard --logdir $DEMO_DIR/out/tensorboard)"
$PY pretrain/tinyllama_fabric.py --model_name "$MODEL" --out_dir "$DEMO_DIR/out" \
    --train_data_dir "$DEMO_DIR/data/train" --val_data_dir "$DEMO_DIR/data/val" --tokenizer_path "$DEMO_DIR/tokenizer" \
    --accelerator cpu --devices 1 --strategy auto --precision 32-true \
    --global_batch_size 16 --micro_batch_size 16 --max_steps "$STEPS" --learning_rate 3e-3 --min_lr 3e-4 \
    --warmup_steps 20 --log_interval 10 --eval_interval 100 --eval_iters 10 --save_interval "$STEPS" \
    --num_workers 1 --resume auto

echo "== 5/6 loss report and plot ($DEMO_DIR/out/loss.png)"
$PY scripts/summarize_run.py "$DEMO_DIR/out" --expect_falling
$PY scripts/plot_run.py "$DEMO_DIR/out"

CKPT=$(ls -d "$DEMO_DIR"/out/iter-*-ckpt.pth | sort | tail -n 1)
if [ -f scripts/create.sh ] && [ -f scripts/generate.py ]; then
    echo "== 6/6 Hugging Face export of $CKPT (verified against transformers) and a sample"
    PYTHON=$PY bash scripts/create.sh "$CKPT" "$DEMO_DIR/hf" --dtype float32 --overwrite
    $PY scripts/generate.py --checkpoint "$DEMO_DIR/hf" --prompt "Der König" --max_new_tokens 60 --temperature 0.8 --top_k 50 --seed 0
fi
echo "Done: checkpoint $CKPT; logs in $DEMO_DIR/out"
