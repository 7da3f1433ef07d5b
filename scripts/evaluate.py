"""Perplexity of a checkpoint or Hugging Face export on a prepared validation set, and its lm-eval benchmark scores.

    python scripts/evaluate.py --checkpoint out/run/iter-00010000-ckpt.pth --data_dir data/val
    python scripts/evaluate.py --checkpoint hf/run --data_dir data/val --max_samples 2000 --block_size 1024
    python scripts/evaluate.py --checkpoint out/run/iter-00010000-ckpt.pth --tasks llammlein_de,belebele_deu_Latn \
        --metrics_run out/run

Samples are the dataset's windows of block_size + 1 tokens (scripts/prepare_data.py output, read with
`lit_gpt.packed_dataset.PackedDataset`), taken in file order: every token of the split except the first of each
window is scored once as a prediction target; the padding of the last partial window is not. Prints one JSON line: mean
token loss (nats), perplexity, tokens, samples; with --tasks also "scores" ({task: {metric: value}}, lm-eval tasks
through `lit_gpt.lm_eval_adapter`). --metrics_run adds the scores to that run's records under the checkpoint's step
(`lit_gpt.benchmarks`: out_dir/evals/, shown by scripts/plot_run.py and scripts/summarize_run.py).
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
from pathlib import Path

from lit_gpt.benchmarks import make_record, open_record_dir, publish_record
from lit_gpt.cli import DefaultsHelpFormatter
from lit_gpt.config import DTYPE_NAMES
from lit_gpt.errors import InputError
from lit_gpt.run_dir import RunDir, checkpoint_step


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=DefaultsHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="checkpoint file (ours or the original TinyLlama/LLäMmlein trainer's), sharded dir or HF "
                   "export dir")
    p.add_argument("--data_dir", type=Path, help="a prepared split, e.g. data/val (perplexity)")
    p.add_argument("--tasks", help="lm-eval tasks, comma-separated, e.g. llammlein_de,belebele_deu_Latn")
    p.add_argument("--limit", type=int, help="--tasks: score only the first N items of each task")
    p.add_argument("--metrics_run", type=Path,
                   help="--tasks: add the scores to this run directory's records under the checkpoint's step")
    p.add_argument("--missing_ok", action="store_true",
                   help="exit 0 with a warning when the checkpoint no longer exists (deleted by checkpoint rotation "
                   "or set aside by a resume before a queued job ran)")
    p.add_argument("--tokenizer", type=Path, help="--tasks: tokenizer directory (default: the run's copy beside the "
                   "checkpoint, or the export's own)")
    p.add_argument("--block_size", type=int, help="tokens per sample (default: the model's block_size)")
    p.add_argument("--batch_size", type=int, default=4, help="samples per forward pass")
    p.add_argument("--max_samples", type=int, default=0, help="score only the first N samples (0: all)")
    p.add_argument("--document_masking", action=argparse.BooleanOptionalAction, default=None,
                   help="attend within documents only (default: as the checkpoint was trained)")
    p.add_argument("--model_name", help="config for checkpoints that record none")
    p.add_argument("--dtype", choices=list(DTYPE_NAMES), default="fp32", help="weights and compute dtype")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    return p.parse_args(argv)


def evaluate(model, dataset, batch_size: int, max_samples: int, document_masking: bool, device) -> dict:
    import torch
    from tqdm import tqdm

    from lit_gpt.loss import token_losses

    with torch.no_grad():
        n = dataset.samples_per_epoch if max_samples <= 0 else min(max_samples, dataset.samples_per_epoch)
        vocab = model.config.padded_vocab_size
        loss_sum, tokens = 0.0, 0
        for start in tqdm(range(0, n, batch_size), desc="evaluating", unit="batch", total=-(-n // batch_size)):
            batch = dataset.get_batch(range(start, min(start + batch_size, n)))
            idx, labels = batch["input_ids"].to(device), batch["labels"].to(device)
            top = max(idx.max().item(), labels.max().item())
            if top >= vocab:
                raise InputError(f"--data_dir {dataset.sources[0].directory}: token id {top} is outside "
                                 f"the model's vocabulary ({vocab}); prepared with another tokenizer?")
            doc_ids = batch["doc_ids"].to(device) if document_masking else None
            loss_sum += token_losses(model(idx, doc_ids=doc_ids), labels)[0].item()
            tokens += int((labels != -100).sum())
        loss = loss_sum / max(tokens, 1)
        return {"loss": loss, "perplexity": math.exp(loss), "tokens": tokens, "samples": n}


def lm_eval_adapter():
    """The module that runs lm-eval tasks on our model (`evaluate_tasks`, `check_tasks_available`); imported only
    for --tasks (lm-eval is an optional dependency and slow to import)."""
    try:
        return importlib.import_module("lit_gpt.lm_eval_adapter")
    except ImportError as e:
        raise InputError(f"--tasks: lm-eval is not installed ({e}); pip install -e '.[eval]'") from None


def checked_tasks(args: argparse.Namespace) -> list[str]:
    """The --tasks list; the flags that go with it are checked too (before anything slow)."""
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks is not None else []
    if args.tasks is not None and not tasks:
        raise InputError(f"--tasks {args.tasks!r}: names no task")
    if args.data_dir is None and not tasks:
        raise InputError("nothing to evaluate: give --data_dir (perplexity), --tasks (benchmarks) or both")
    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit {args.limit}: must be at least 1")
    if args.metrics_run is not None:
        if not tasks:
            raise InputError("--metrics_run records benchmark scores: give --tasks")
        if not args.metrics_run.is_dir():
            raise InputError(f"--metrics_run {args.metrics_run}: no such run directory")
        try:
            checkpoint_step(args.checkpoint)
        except ValueError as e:  # names the form
            raise InputError(f"--checkpoint {e} (--metrics_run records scores under a training checkpoint's step)") \
                from None
    return tasks


def main(argv=None) -> int:
    args = parse_args(argv)  # before torch is imported: --help and flag errors answer at once
    record_dir = None
    try:
        tasks = checked_tasks(args)
        if args.batch_size < 1:
            raise InputError(f"--batch_size {args.batch_size}: must be at least 1")
        if tasks:
            adapter = lm_eval_adapter()
            try:
                adapter.check_tasks_available(tasks)
            except InputError as e:
                raise InputError(str(e) if str(e).startswith("--tasks") else f"--tasks: {e}") from None
        if args.metrics_run is not None:  # opened before the checkpoint: see lit_gpt.benchmarks
            record_dir = open_record_dir(args.metrics_run, args.checkpoint.name)
        if args.missing_ok and not args.checkpoint.exists():
            return _gone(args.checkpoint)

        import torch

        from lit_gpt.checkpoint.load import load_gpt
        from lit_gpt.hf_convert import TORCH_DTYPES

        args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            model, config, tokenizer_dir, meta = load_gpt(args.checkpoint, args.model_name, args.tokenizer,
                                                          dtype=TORCH_DTYPES[args.dtype], with_tokenizer=bool(tasks))
        except InputError:
            if args.missing_ok and not args.checkpoint.exists():  # deleted while it was being read
                return _gone(args.checkpoint)
            raise
        model = model.to(args.device)
        result = {"checkpoint": str(args.checkpoint)}
        if args.data_dir is not None:
            result.update(perplexity(model, config, meta, args))
        if tasks:
            from lit_gpt.tokenizer import Tokenizer

            try:
                scores = adapter.evaluate_tasks(model, Tokenizer(tokenizer_dir), tasks, batch_size=args.batch_size,
                                                limit=args.limit, device=args.device)
            except ConnectionError as e:  # a dataset that is not in the cache, offline (the Slurm job's default)
                raise InputError(f"--tasks: {e}; pre-fetch the datasets where there is internet, into the "
                                 f"HF_DATASETS_CACHE this node reads (README \"Evaluation\")") from None
            result.update(tasks=tasks, limit=args.limit, scores=scores)
            if record_dir is not None:
                record = make_record(checkpoint_step(args.checkpoint), args.checkpoint, scores,
                                     tokens=meta.get("tokens_seen"), limit=args.limit)
                result["record"] = str(RunDir(args.metrics_run).evals / args.checkpoint.name /
                                       publish_record(record_dir, record))
    except InputError as e:  # a bad flag, checkpoint, data directory or task (CheckpointError is one)
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if record_dir is not None:
            os.close(record_dir)
    print(json.dumps(result))
    return 0


def _gone(checkpoint: Path) -> int:
    print(f"warning: {checkpoint} no longer exists (deleted by --keep_last_checkpoints rotation or set aside by a "
          f"resume before this job ran): nothing scored. Keep more checkpoints to score each one.", file=sys.stderr)
    return 0


def perplexity(model, config, meta: dict, args: argparse.Namespace) -> dict:
    """--data_dir: the loss and perplexity on the split, with the settings used."""
    from lit_gpt.checkpoint.load import trained_with_document_masking
    from lit_gpt.packed_dataset import PackedDataset

    block_size = args.block_size or config.block_size
    if not 0 < block_size <= config.block_size:
        raise InputError(f"--block_size {block_size}: must be in [1, {config.block_size}] for this model")
    masking = args.document_masking
    if masking is None:
        masking = trained_with_document_masking(meta)
    try:
        dataset = PackedDataset([args.data_dir], block_size=block_size, with_doc_ids=masking)
    except InputError as e:  # names the file
        raise InputError(f"--data_dir {args.data_dir}: {e}") from None
    result = evaluate(model, dataset, args.batch_size, args.max_samples, masking, args.device)
    return {**result, "data_dir": str(args.data_dir), "block_size": block_size, "document_masking": masking}


if __name__ == "__main__":
    sys.exit(main())
