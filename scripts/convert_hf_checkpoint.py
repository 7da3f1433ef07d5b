"""Convert a Hugging Face Llama directory (e.g. the published LLäMmlein weights) into our checkpoint format.

    python scripts/convert_hf_checkpoint.py --hf_dir LLaMmlein_1B --out_dir checkpoints/LLaMmlein_1B
    python pretrain/tinyllama_fabric.py --init_from checkpoints/LLaMmlein_1B/lit_model.pth --model_name LLaMmlein_1B ...

Writes --out_dir/lit_model.pth ({"model": lit state dict, "config": Config.to_dict()}), model_config.json and
tokenizer/ (the tokenizer files of --hf_dir or --tokenizer), the layout the trainer and scripts/generate.py read.
The config is a registry entry when config.json's architecture matches one (the chosen name is printed), else a
custom config named after the directory. Only safetensors weights are read; nothing is fetched from the Hub.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from lit_gpt.checkpoint.layout import CheckpointError
from lit_gpt.checkpoint.load import check_tokenizer_dir, copy_tokenizer_files
from lit_gpt.checkpoint.publish import atomic_output_dir
from lit_gpt.hf_convert import TORCH_DTYPES, is_hf_dir, read_hf_checkpoint
from lit_gpt.run_dir import RunDir
from lit_gpt.tokenizer import Tokenizer

CHECKPOINT_NAME = "lit_model.pth"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf_dir", type=Path, required=True, help="directory with config.json and *.safetensors")
    p.add_argument("--out_dir", type=Path, required=True)
    p.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: --hf_dir)")
    p.add_argument("--dtype", choices=["auto", *TORCH_DTYPES], default="auto",
                   help="dtype of the written weights (auto: as stored)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out_dir")
    return p.parse_args(argv)


def convert(args: argparse.Namespace) -> Path:
    if not is_hf_dir(args.hf_dir):
        raise CheckpointError(f"--hf_dir {args.hf_dir}: not a Hugging Face model directory "
                              "(needs config.json and *.safetensors)")
    flag = "--tokenizer" if args.tokenizer else "--hf_dir"
    tokenizer_dir = check_tokenizer_dir(args.tokenizer or args.hf_dir, flag)
    try:
        vocab_size = Tokenizer(tokenizer_dir).vocab_size
    except ValueError as e:
        raise CheckpointError(f"{flag} {tokenizer_dir}: {e}") from None
    try:
        config, tensors = read_hf_checkpoint(args.hf_dir, vocab_size=vocab_size)
    except ValueError as e:
        raise CheckpointError(f"--hf_dir {e}") from None
    dtype = None if args.dtype == "auto" else TORCH_DTYPES[args.dtype]
    inputs = {"--hf_dir": args.hf_dir, "--tokenizer": args.tokenizer}
    with atomic_output_dir(args.out_dir, args.overwrite, inputs=inputs) as tmp:
        model = {key: t if dtype is None else t.to(dtype) for key, t in tensors}
        torch.save({"model": model, "config": config.to_dict(), "source": {"hf_dir": args.hf_dir.name}},
                   tmp / CHECKPOINT_NAME)
        RunDir(tmp).model_config.write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        copy_tokenizer_files(tokenizer_dir, RunDir(tmp).tokenizer)
    kind = "registry config" if config.name != args.hf_dir.name else "custom config"
    print(f"wrote {args.out_dir / CHECKPOINT_NAME} ({kind} {config.name!r}, {len(model)} tensors)")
    return args.out_dir / CHECKPOINT_NAME


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        convert(args)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
