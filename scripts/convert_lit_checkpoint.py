"""Export a training checkpoint to a Hugging Face `LlamaForCausalLM` directory.

    python scripts/convert_lit_checkpoint.py --checkpoint out/run/iter-00100000-ckpt.pth --out_dir hf/run --verify

The checkpoint is a full `.pth` file or a sharded checkpoint directory of this toolkit, or a checkpoint of the original
TinyLlama/LLäMmlein trainer (xformers MLP names; its model from --model_name or its hparams' model_name; its
tokenizer from --tokenizer, e.g. the published LLäMmlein one). The output directory gets
`model.safetensors` (or shards + `model.safetensors.index.json` above --max_shard_size), `config.json`,
`generation_config.json`, the tokenizer files and a README model card with the training provenance. Tensors are
converted and written shard by shard from a memory-mapped (or per-tensor) read, so peak memory is about one shard,
not a copy of the model per stage. Everything is written into a temp dir beside --out_dir and renamed only once
complete (and verified, with --verify): a failed export leaves nothing behind.

--verify loads the export with transformers (offline), compares its logits on a random batch with our model's
(fp32; a bf16 export is compared against our model with the same bf16-rounded weights) and checks that its
tokenizer encodes and decodes German text exactly like ours.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from lit_gpt.checkpoint.layout import CheckpointError
from lit_gpt.config import DTYPE_NAMES, Config
from lit_gpt.run_dir import RunDir

if TYPE_CHECKING:
    import torch

    from lit_gpt.checkpoint.load import LazyStateDict

VERIFY_TOLERANCE = 1e-4
GERMAN_SAMPLES = (
    "Der Frühling in Würzburg: Über die Alte Mainbrücke gehen, Schäufele essen und Grüße nach Köln schicken.",
    "  Zwei Leerzeichen, ein Tab\tund\nZeilenumbrüche; Maß, Straße, ÄÖÜ äöü ß ẞ – 3,14 € „Anführungszeichen“.",
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, help="iter-XXXXXXXX-ckpt.pth file or sharded directory")
    p.add_argument("--out_dir", type=Path, required=True)
    p.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: the checkpoint's out_dir/tokenizer)")
    p.add_argument("--model_name", help="registry config to use; must match the checkpoint (default: its own config, "
                   "model_config.json beside it, or an original checkpoint's hparams model_name)")
    p.add_argument("--dtype", choices=list(DTYPE_NAMES), default="bf16", help="dtype of the exported weights")
    p.add_argument("--max_shard_size", default="5GB", help="split model.safetensors above this size (e.g. 2GB, 500MiB)")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=False,
                   help="compare the export's logits and tokenizer with ours (needs two fp32 copies, one at a time)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out_dir")
    return p.parse_args(argv)


def parse_size(text: str) -> int:
    """Bytes in '5GB' (decimal units, as Hugging Face), '512MiB' (binary) or a plain integer."""

    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(text), flags=re.IGNORECASE)
    if not match:
        raise CheckpointError(f"--max_shard_size {text!r}: use e.g. 5GB, 500MB, 2GiB or a number of bytes")
    value, unit = float(match.group(1)), (match.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    size = int(value * base ** "BKMGT".index(unit[0]))
    if size <= 0:
        raise CheckpointError(f"--max_shard_size {text!r}: must be positive")
    return size


# ------------------------------------------------------------------ weights
def plan_shards(config: Config, dtype: torch.dtype, max_shard_size: int) -> list[list[str]]:
    """Lit keys per shard, in order; a lit tensor's HF parts (q/k/v) always share a shard."""
    import torch

    from lit_gpt.hf_convert import lit_model_shapes

    itemsize = torch.empty((), dtype=dtype).element_size()
    shards: list[list[str]] = [[]]
    used = 0
    for key, shape in lit_model_shapes(config).items():
        size = itemsize * torch.Size(shape).numel()
        if shards[-1] and used + size > max_shard_size:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += size
    return shards


def write_weights(model: LazyStateDict, config: Config, out: Path, dtype: torch.dtype, max_shard_size: int) -> int:
    """Write the safetensors file(s); holds one shard's converted tensors at a time. Returns the bytes written."""
    from safetensors.torch import save_file

    from lit_gpt.hf_convert import lit_to_hf

    shards = plan_shards(config, dtype, max_shard_size)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map, total = {}, 0
    for keys, filename in zip(shards, names):
        tensors = {}
        for key in keys:
            for name, t in lit_to_hf(config, key, model.as_dtype(key, dtype)).items():
                tensors[name] = t.contiguous()
                weight_map[name] = filename
                total += t.nbytes
        _save_safetensors(save_file, tensors, out / filename)
        del tensors
        for key in keys:
            model.release(key)  # source pages that were written as they are (export dtype == checkpoint dtype)
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return total


def _save_safetensors(save_file, tensors: dict, path: Path) -> None:
    """safetensors reports a failed write (a full disk) as a SafetensorError quoting Rust's I/O error: raised here
    as the OSError it was, so that the export says it in one line."""
    try:
        save_file(tensors, path, metadata={"format": "pt"})
    except Exception as e:
        code = re.search(r"Os \{ code: (\d+)", str(e))
        if code is None:
            raise
        number = int(code.group(1))
        raise OSError(number, os.strerror(number), str(path)) from None


# ------------------------------------------------------------------ config, tokenizer, model card
def write_configs_and_tokenizer(out: Path, config: Config, dtype: torch.dtype, tokenizer_dir: Path) -> None:
    from lit_gpt.checkpoint.load import copy_tokenizer_files
    from lit_gpt.hf_convert import hf_config
    from lit_gpt.tokenizer import Tokenizer

    try:
        tokenizer = Tokenizer(tokenizer_dir)
    except ValueError as e:
        raise CheckpointError(f"--tokenizer {tokenizer_dir}: {e}") from None
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(f"--tokenizer {tokenizer_dir}: {tokenizer.vocab_size} tokens, but the model was trained "
                              f"with vocab_size {config.vocab_size}")
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise CheckpointError(f"--tokenizer {tokenizer_dir}: no tokenizer.json (AutoTokenizer needs it; "
                              "scripts/train_tokenizer.py writes one)")
    copy_tokenizer_files(tokenizer_dir, out)
    (out / "config.json").write_text(json.dumps(hf_config(config, dtype, tokenizer.bos_id, tokenizer.eos_id), indent=2) + "\n")
    generation = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": None}
    if tokenizer.vocab_size < config.padded_vocab_size:
        # Padding rows of the lm_head are no tokens; keep sampling off them, as scripts/generate.py does.
        generation["suppress_tokens"] = list(range(tokenizer.vocab_size, config.padded_vocab_size))
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def write_model_card(out: Path, ckpt: dict, config: Config, checkpoint: Path, dtype: str, verified: str | None,
                     title: str = "model") -> None:
    import torch

    from lit_gpt.hf_convert import lit_model_shapes

    def fmt(value) -> str:
        return f"{value:,}" if isinstance(value, int) else ("unknown" if value is None else str(value))

    data = ckpt.get("data") if isinstance(ckpt.get("data"), dict) else {}
    manifest = json.dumps(data.get("manifest"), indent=2, default=str, ensure_ascii=False)
    if len(manifest) > 8000:
        manifest = manifest[:8000] + "\n... (truncated; the full manifest is in the training checkpoint)"
    n_params = sum(torch.Size(s).numel() for s in lit_model_shapes(config).values())
    rows = [("source checkpoint", f"`{checkpoint.name}`"), ("optimizer steps", fmt(ckpt.get("step_count"))),
            ("micro-batch iterations", fmt(ckpt.get("iter_num"))), ("tokens seen", fmt(ckpt.get("tokens_seen"))),
            ("samples seen", fmt(data.get("samples_seen"))), ("parameters", f"{n_params:,}"),
            ("weights dtype", dtype), ("verified against the training code", verified or "not run (--no-verify)")]
    card = "\n".join([
        "---", "language:", "- de", "library_name: transformers", "pipeline_tag: text-generation",
        "tags:", "- llama", "- llammlein", "---", "",
        f"# {title}", "",
        "A Llama-style causal language model, exported from a training checkpoint of the LLäMmlein pretraining "
        "toolkit to Hugging Face `LlamaForCausalLM` (no remote code).", "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/dir")',
        'model = AutoModelForCausalLM.from_pretrained("path/to/this/dir")',
        "```", "",
        "## Provenance", "", "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], "",
        "## Model config", "", "```json", json.dumps(config.to_dict(), indent=2), "```", "",
        "## Training data", "", "```json", manifest, "```", "",
        "## Training hyperparameters", "", "```json",
        json.dumps(ckpt.get("hparams"), indent=2, default=str, ensure_ascii=False), "```", "",
    ])
    (out / "README.md").write_text(card, encoding="utf-8")


# ------------------------------------------------------------------ verification
def verify_export(export_dir: Path, model: LazyStateDict, config: Config, tokenizer_dir: Path,
                  dtype: torch.dtype, seed: int = 0) -> float:
    """Max abs logit difference between the export (via transformers) and our model; raises above tolerance."""
    import torch


    with torch.no_grad():
        os.environ["HF_HUB_OFFLINE"] = "1"  # a local directory only: never reach for the Hub
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        from lit_gpt.model import GPT

        hf_logging.disable_progress_bar()
        from lit_gpt.tokenizer import Tokenizer

        generator = torch.Generator().manual_seed(seed)
        idx = torch.randint(0, config.vocab_size, (2, min(64, config.block_size)), generator=generator)
        with torch.device("meta"):
            ours = GPT(config)
        # Our model with exactly the exported values (rounded to the export dtype), computed in fp32 like theirs.
        # One fp32 model in memory at a time: ours is freed (and its source pages dropped) before theirs loads.
        ours.load_state_dict({k: model.as_dtype(k, dtype).float() for k in model}, assign=True)
        expected = ours.eval()(idx)
        del ours
        for key in model:
            model.release(key)
        hf = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32, local_files_only=True).eval()
        got = hf(idx).logits
        del hf
        if got.shape != expected.shape:
            raise CheckpointError(f"--verify: {export_dir} gives logits of shape {list(got.shape)}, ours {list(expected.shape)}")
        diff = (got - expected).abs().max().item()
        if not diff <= VERIFY_TOLERANCE:
            raise CheckpointError(f"--verify: logits of the export differ from ours by {diff:.3g} (> {VERIFY_TOLERANCE})")

        ours_tok = Tokenizer(tokenizer_dir)
        hf_tok = AutoTokenizer.from_pretrained(export_dir, local_files_only=True)
        for text in GERMAN_SAMPLES:
            ids, hf_ids = ours_tok.encode(text), hf_tok(text)["input_ids"]
            if ids != hf_ids:
                raise CheckpointError(f"--verify: the exported tokenizer encodes {text[:40]!r}... as {hf_ids[:8]}..., "
                                      f"ours as {ids[:8]}...")
            if hf_tok.decode(hf_ids, skip_special_tokens=True) != ours_tok.decode(ids):
                raise CheckpointError(f"--verify: the exported tokenizer decodes {text[:40]!r}... differently from ours")
        return diff


# ------------------------------------------------------------------ main
def export(args: argparse.Namespace) -> Path:
    from lit_gpt.checkpoint.load import find_tokenizer, load_weights, resolve_config
    from lit_gpt.checkpoint.publish import atomic_output_dir
    from lit_gpt.hf_convert import TORCH_DTYPES

    dtype = TORCH_DTYPES[args.dtype]
    max_shard_size = parse_size(args.max_shard_size)
    inputs = {"--checkpoint": args.checkpoint,
              "--tokenizer" if args.tokenizer else "tokenizer": args.tokenizer or RunDir.of_checkpoint(args.checkpoint).tokenizer}
    with atomic_output_dir(args.out_dir, args.overwrite, inputs=inputs) as tmp:
        ckpt = load_weights(args.checkpoint)
        config = resolve_config(ckpt, args.checkpoint, args.model_name)
        tokenizer_dir = find_tokenizer(args.checkpoint, args.tokenizer)
        write_configs_and_tokenizer(tmp, config, dtype, tokenizer_dir)
        size = write_weights(ckpt["model"], config, tmp, dtype, max_shard_size)
        verified = None
        if args.verify:
            diff = verify_export(tmp, ckpt["model"], config, tokenizer_dir, dtype)
            verified = f"logits max abs diff {diff:.2e} (fp32, tolerance {VERIFY_TOLERANCE}); tokenizer identical"
            print(f"verified: {verified}")
        # Titled after --out_dir: `tmp` is only the hidden temp dir it becomes.
        write_model_card(tmp, ckpt, config, args.checkpoint, str(dtype).removeprefix("torch."), verified,
                         title=args.out_dir.resolve().name or "model")
    print(f"wrote {args.out_dir} ({size / 1e9:.2f} GB of {str(dtype).removeprefix('torch.')} weights)")
    return args.out_dir


def main(argv=None) -> int:
    args = parse_args(argv)  # before torch is imported: --help and flag errors answer at once

    try:
        export(args)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
