"""Sample text from a training checkpoint or a Hugging Face export directory, with our model and its KV cache.

    python scripts/generate.py --checkpoint out/run/iter-00010000-ckpt.pth --prompt "Der König" --max_new_tokens 60
    python scripts/generate.py --checkpoint hf/run --prompt "Es war einmal" --temperature 0.8 --top_k 50 --top_p 0.95

--temperature 0 decodes greedily. Sampling never picks the lm_head's padding rows (ids the tokenizer lacks) and stops
at the tokenizer's EOS. The tokenizer is --tokenizer, else the export directory itself, else the checkpoint's
out_dir/tokenizer.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from lit_gpt.checkpoint.layout import CheckpointError
from lit_gpt.checkpoint.load import load_gpt
from lit_gpt.hf_convert import TORCH_DTYPES
from lit_gpt.model import GPT


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="checkpoint file (ours or the original TinyLlama/LLäMmlein trainer's), sharded dir or HF "
                   "export dir")
    p.add_argument("--prompt", default="", help="text to continue (BOS is added as the tokenizer's policy says)")
    p.add_argument("--max_new_tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top_k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top_p", type=float, default=None, help="nucleus sampling: the smallest set with this mass")
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--tokenizer", type=Path)
    p.add_argument("--model_name", help="config for checkpoints that record none")
    p.add_argument("--dtype", choices=list(TORCH_DTYPES), default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def validate(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1:
        raise CheckpointError(f"--max_new_tokens {args.max_new_tokens}: must be at least 1")
    if args.temperature < 0:
        raise CheckpointError(f"--temperature {args.temperature}: must be >= 0")
    if args.top_k is not None and args.top_k < 1:
        raise CheckpointError(f"--top_k {args.top_k}: must be at least 1")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise CheckpointError(f"--top_p {args.top_p}: must be in (0, 1]")
    if args.num_samples < 1:
        raise CheckpointError(f"--num_samples {args.num_samples}: must be at least 1")


def next_token(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id from 1-D logits."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        outside = probs.cumsum(-1) - probs > top_p  # the mass before a token already covers top_p
        logits = logits.masked_fill(torch.zeros_like(outside).scatter(0, order, outside), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)


@torch.no_grad()
def generate(model: GPT, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
             vocab_size: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Prompt + up to `max_new_tokens` ids (stopping after EOS); one forward pass per new token via the KV cache.

    Only ids below `vocab_size` are sampled (the lm_head may have padding rows beyond the tokenizer).
    """
    T = prompt.numel()
    if T == 0:
        raise ValueError("the prompt is empty (the tokenizer adds no BOS): give some text")
    total = T + max_new_tokens
    if total > model.config.block_size:
        raise ValueError(f"prompt ({T} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's block_size "
                         f"({model.config.block_size})")
    device = prompt.device
    model.set_kv_cache(batch_size=1, max_seq_length=total, device=device)
    try:
        tokens = [prompt]
        logits = model(prompt.view(1, -1), input_pos=torch.arange(T, device=device))[0, -1]
        for pos in range(T, total):
            token = next_token(logits[:vocab_size], temperature, top_k, top_p, generator)
            tokens.append(token)
            if eos_id is not None and token.item() == eos_id or pos == total - 1:
                break
            logits = model(token.view(1, 1), input_pos=torch.tensor([pos], device=device))[0, -1]
    finally:
        model.clear_kv_cache()
    return torch.cat(tokens)


def main(argv=None) -> int:
    from lit_gpt.tokenizer import Tokenizer

    args = parse_args(argv)
    try:
        validate(args)
        model, config, tokenizer_dir, _ = load_gpt(args.checkpoint, args.model_name, args.tokenizer,
                                                   dtype=TORCH_DTYPES[args.dtype])
        tokenizer = Tokenizer(tokenizer_dir)
        prompt = torch.tensor(tokenizer.encode(args.prompt), dtype=torch.long, device=args.device)
        model.to(args.device)
        generator = torch.Generator(args.device).manual_seed(args.seed)
        for i in range(args.num_samples):
            ids = generate(model, prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                           tokenizer.eos_id, min(tokenizer.vocab_size, config.padded_vocab_size), generator)
            if args.num_samples > 1:
                print(f"--- sample {i + 1}")
            print(tokenizer.decode(ids.tolist()), flush=True)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
