"""Shared fixtures for the Hugging Face export/import/generation tests: a small German tokenizer and checkpoints
laid out as the trainer writes them (everything built locally; nothing comes from the Hub)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_script, write_corpus

from lit_gpt.config import Config
from lit_gpt.model import GPT

os.environ["HF_HUB_OFFLINE"] = "1"
TOKENIZER_VOCAB = 500  # padded to 512 by the model: exercises the padded lm_head rows

# n_embd 64 with 8 heads: MHA (8 groups), GQA (2 groups), MQA (1 group).
ATTENTION_VARIANTS = {"mha": 8, "gqa": 2, "mqa": 1}


def small_config(n_query_groups: int = 2, **kw) -> Config:
    base = dict(name="test_small", n_layer=2, n_head=8, n_embd=64, n_query_groups=n_query_groups,
                intermediate_size=160, vocab_size=TOKENIZER_VOCAB, block_size=128)
    return Config(**{**base, **kw})


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("hf_tokenizer")
    corpus = write_corpus(base / "corpus", n_docs=300)
    out = base / "tokenizer"
    run_script("scripts/train_tokenizer.py", "--input", str(corpus), "--output_dir", str(out),
               "--vocab_size", str(TOKENIZER_VOCAB), "--num_threads", "1")
    return out


def random_state(config: Config, seed: int = 0) -> dict[str, torch.Tensor]:
    """A randomly initialised model's state; RMSNorm weights perturbed too, so that every tensor is distinctive."""
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_f" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.state_dict()


def write_run_dir(out_dir: Path, config: Config, tokenizer: Path, state: dict | None = None, step: int = 10):
    """A trainer-style out_dir: model_config.json, tokenizer/ and (given a state) one full checkpoint, returned."""
    import json

    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copytree(tokenizer, out_dir / "tokenizer", dirs_exist_ok=True)
    (out_dir / "model_config.json").write_text(json.dumps(config.to_dict()))
    if state is None:
        return None
    path = out_dir / f"iter-{step:08d}-ckpt.pth"
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": []}, "iter_num": step * 4,
                "step_count": step, "tokens_seen": step * 4 * 2 * config.block_size,
                "hparams": {"learning_rate": 4e-4, "global_batch_size": 8}, "config": config.to_dict(),
                "data": {"global_batch_size": 8, "samples_seen": step * 8,
                         "manifest": [{"file": "train_0000000000.bin", "tokens": 4096}]}}, path)
    return path


# Characters LLäMmlein's tokenizer.json adds as tokens of their own (its SentencePiece model lacks them).
LLAMMLEIN_ADDED = ["\t", "\n", "$", "<", "\\", "^", "`", "{", "}", "~"]


def llammlein_like_tokenizer(texts: list[str], out: Path, vocab_size: int = 1200) -> Path:
    """A tokenizer directory with the properties of the published LLäMmlein one, built locally from `texts`.

    tokenizer.model: SentencePiece BPE with its default normalization (tabs and newlines become spaces), trained
    without the added characters; tokenizer.json: transformers' conversion of that model plus LLAMMLEIN_ADDED as
    tokens vocab_size, vocab_size + 1, ... (not special, normalized); tokenizer_config.json: LlamaTokenizer,
    add_prefix_space false, BOS yes, EOS no."""
    import json

    import sentencepiece as spm
    from transformers import LlamaTokenizer

    out.mkdir(parents=True)
    lines = [line for text in texts for line in text.split("\n")
             if line.strip() and not any(c in line for c in LLAMMLEIN_ADDED)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(out / "tokenizer"),
                                   model_type="bpe", vocab_size=vocab_size, byte_fallback=True, split_digits=True,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    (out / "tokenizer.vocab").unlink()
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True}))
    LlamaTokenizer.from_pretrained(str(out)).save_pretrained(str(out))  # writes the converted tokenizer.json

    converted = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    added = [{"id": vocab_size + i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": True, "special": False} for i, c in enumerate(LLAMMLEIN_ADDED)]
    converted["added_tokens"] += added
    (out / "tokenizer.json").write_text(json.dumps(converted, ensure_ascii=False), encoding="utf-8")
    specials = {str(i): {"content": c, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                         "special": True} for i, c in enumerate(["<unk>", "<s>", "</s>"])}
    config = {"add_bos_token": True, "add_eos_token": False, "add_prefix_space": False, "legacy": False,
              "added_tokens_decoder": {**specials, **{str(a["id"]): {k: v for k, v in a.items() if k != "id"}
                                                      for a in added}},
              "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
              "clean_up_tokenization_spaces": False, "tokenizer_class": "LlamaTokenizer"}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json", "tokenizer.model", "tokenizer_config.json"]
    return out


def export(checkpoint: Path, out_dir: Path, *extra: str, check: bool = True):
    return run_script("scripts/convert_lit_checkpoint.py", "--checkpoint", str(checkpoint), "--out_dir", str(out_dir),
                      *extra, check=check)


def load_safetensors_dir(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors
