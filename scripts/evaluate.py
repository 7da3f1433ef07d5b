"""Perplexity of a checkpoint or Hugging Face export on a prepared validation set.

    python scripts/evaluate.py --checkpoint out/run/iter-00010000-ckpt.pth --data_dir data/val
    python scripts/evaluate.py --checkpoint hf/run --data_dir data/val --max_samples 2000 --block_size 1024

Samples are the dataset's windows of block_size + 1 tokens (scripts/prepare_data.py output, read with
`lit_gpt.packed_dataset.PackedDataset`), taken in file order: every token of the split except the first of each
window is scored once as a prediction target; the padding of the last partial window is not. Prints one JSON line: mean token loss (nats), perplexity, tokens, samples.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from lit_gpt.cli import DefaultsHelpFormatter
from lit_gpt.config import DTYPE_NAMES
from lit_gpt.errors import InputError


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=DefaultsHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="checkpoint file (ours or the original TinyLlama/LLäMmlein trainer's), sharded dir or HF "
                   "export dir")
    p.add_argument("--data_dir", type=Path, required=True, help="a prepared split, e.g. data/val")
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


def main(argv=None) -> int:
    args = parse_args(argv)  # before torch is imported: --help and flag errors answer at once
    import torch

    from lit_gpt.checkpoint.load import load_gpt, trained_with_document_masking
    from lit_gpt.hf_convert import TORCH_DTYPES
    from lit_gpt.packed_dataset import PackedDataset

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        if args.batch_size < 1:
            raise InputError(f"--batch_size {args.batch_size}: must be at least 1")
        model, config, _, meta = load_gpt(args.checkpoint, args.model_name, dtype=TORCH_DTYPES[args.dtype],
                                          with_tokenizer=False)
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
        result = evaluate(model.to(args.device), dataset, args.batch_size, args.max_samples, masking, args.device)
    except InputError as e:  # a bad flag, checkpoint or data directory (CheckpointError is one)
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({**result, "checkpoint": str(args.checkpoint), "data_dir": str(args.data_dir),
                      "block_size": block_size, "document_masking": masking}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
