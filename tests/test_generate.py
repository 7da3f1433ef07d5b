"""Generation with our KV cache (greedy decoding equals transformers' `generate` on the export; sampling filters)
and perplexity evaluation, from training checkpoints and HF exports alike."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import run_script
from hf_helpers import random_state, small_config, write_run_dir

from lit_gpt.checkpoint.load import load_gpt
from lit_gpt.tokenizer import Tokenizer
from scripts.convert_lit_checkpoint import main as export_main
from scripts.generate import generate, next_token
from scripts.generate import main as generate_main

PROMPT = "Der König von Würzburg"


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer_dir):
    base = tmp_path_factory.mktemp("generate")
    config = small_config(2)
    state = random_state(config, seed=5)
    state["lm_head.weight"][500:] *= 10  # padding rows that would win if anything sampled them
    ckpt = write_run_dir(base / "run", config, tokenizer_dir, state)
    assert export_main(["--checkpoint", str(ckpt), "--out_dir", str(base / "hf"), "--dtype", "fp32"]) == 0
    return ckpt, base / "hf"


def test_greedy_kv_cache_matches_transformers_generate(exported):
    from transformers import AutoModelForCausalLM

    ckpt, hf_dir = exported
    model, config, tok_dir, _ = load_gpt(hf_dir)
    tokenizer = Tokenizer(tok_dir)
    prompt = torch.tensor(tokenizer.encode(PROMPT))
    ours = generate(model, prompt, 32, temperature=0, eos_id=tokenizer.eos_id, vocab_size=tokenizer.vocab_size)
    assert ours.numel() == prompt.numel() + 32

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, local_files_only=True).eval()
    theirs = hf.generate(prompt[None], max_new_tokens=32, do_sample=False)[0]
    assert ours.tolist() == theirs.tolist()
    # The export's padded lm_head rows are suppressed on both sides (else ids >= 500 would win here).
    with torch.no_grad():
        full = model(ours[None])[0, prompt.numel() - 1:-1]
    assert (full.argmax(-1) >= tokenizer.vocab_size).any()

    # The training checkpoint itself decodes the same (the export is fp32).
    from_ckpt, *_ = load_gpt(ckpt)
    assert generate(from_ckpt, prompt, 32, temperature=0, eos_id=tokenizer.eos_id,
                    vocab_size=tokenizer.vocab_size).tolist() == ours.tolist()


def test_kv_cache_equals_full_recompute(exported):
    model, *_ = load_gpt(exported[1])
    prompt = torch.tensor([1, 17, 42, 99])
    cached = generate(model, prompt, 12, temperature=0)
    ids = prompt
    with torch.no_grad():
        for _ in range(12):
            ids = torch.cat([ids, model(ids[None])[0, -1].argmax(-1, keepdim=True)])
    assert cached.tolist() == ids.tolist()


def test_sampling_filters_and_seed():
    logits = torch.tensor([0.0, 3.0, 2.9, -1.0, 1.0])
    def draws(temperature=1.0, **kw):
        return {next_token(logits, temperature, generator=torch.Generator().manual_seed(s), **kw).item()
                for s in range(200)}

    assert draws(top_k=1, top_p=None) == {1}
    assert draws(top_k=2, top_p=None) == {1, 2}
    assert draws(top_k=None, top_p=0.3) == {1}  # the top token alone already holds > 30%
    assert draws(top_k=None, top_p=0.6) == {1, 2}
    assert len(draws(10.0, top_k=None, top_p=None)) == 5
    assert next_token(logits, 0.0, None, None).item() == 1
    first = [next_token(logits, 2.0, None, None, torch.Generator().manual_seed(7)).item() for _ in range(3)]
    assert len(set(first)) == 1


def test_cli_on_export_and_checkpoint(exported, capsys):
    ckpt, hf_dir = exported
    args = ["--prompt", PROMPT, "--max_new_tokens", "16", "--temperature", "0"]
    from_export = run_script("scripts/generate.py", "--checkpoint", str(hf_dir), *args).stdout
    assert generate_main(["--checkpoint", str(ckpt), *args]) == 0
    assert capsys.readouterr().out == from_export and from_export.startswith(PROMPT)

    sampling = ["--checkpoint", str(hf_dir), "--prompt", PROMPT, "--max_new_tokens", "8", "--temperature", "0.9",
                "--top_k", "50", "--top_p", "0.95", "--seed", "3", "--num_samples", "2"]
    assert generate_main(sampling) == 0
    first = capsys.readouterr().out
    assert first.count("--- sample") == 2
    assert generate_main(sampling) == 0 and capsys.readouterr().out == first  # seeded

    assert generate_main(["--checkpoint", str(hf_dir), "--max_new_tokens", "500"]) == 2
    assert "block_size" in capsys.readouterr().err


def test_evaluate_perplexity(prepared_data, tmp_path, capsys):
    from lit_gpt.config import Config
    from scripts.evaluate import main as evaluate_main

    config = Config.from_name("micro")  # the vocabulary (512) of the prepared data
    ckpt = write_run_dir(tmp_path / "run", config, prepared_data["tokenizer"], random_state(config))
    assert export_main(["--checkpoint", str(ckpt), "--out_dir", str(tmp_path / "hf"), "--dtype", "fp32"]) == 0
    capsys.readouterr()
    results = []
    for source in (ckpt, tmp_path / "hf"):
        assert evaluate_main(["--checkpoint", str(source), "--data_dir", str(prepared_data["val"]),
                              "--batch_size", "3"]) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert results[0]["tokens"] == results[1]["tokens"] > 0
    assert results[0]["loss"] == pytest.approx(results[1]["loss"], abs=1e-5)
    assert 300 < results[0]["perplexity"] < 800  # a random model is close to uniform over 512 ids

    assert evaluate_main(["--checkpoint", str(ckpt), "--data_dir", str(prepared_data["val"]), "--max_samples", "2",
                          "--block_size", "64", "--document_masking"]) == 0
    few = json.loads(capsys.readouterr().out)
    assert few["samples"] == 2 and few["tokens"] <= 128 and few["document_masking"] is True
    assert evaluate_main(["--checkpoint", str(ckpt), "--data_dir", str(tmp_path / "nope")]) == 2
    assert "--data_dir" in capsys.readouterr().err


def test_original_checkpoint_generates_and_evaluates_like_its_export(prepared_data, tokenizer_dir, tmp_path, capsys):
    # The original trainer's checkpoint (its MLP names and metadata) read directly by generate.py and evaluate.py.
    from original_helpers import save_original, trained_original

    from scripts.evaluate import main as evaluate_main

    model, optimizer = trained_original("xformers_free")
    ckpt = save_original(tmp_path / "orig" / "iter-00000012-ckpt.pth", model, optimizer, "fsdp")
    hf = tmp_path / "hf"
    assert export_main(["--checkpoint", str(ckpt), "--out_dir", str(hf), "--dtype", "fp32", "--tokenizer",
                        str(tokenizer_dir)]) == 0
    capsys.readouterr()
    args = ["--prompt", PROMPT, "--max_new_tokens", "12", "--temperature", "0"]
    assert generate_main(["--checkpoint", str(ckpt), "--tokenizer", str(tokenizer_dir), *args]) == 0
    from_original = capsys.readouterr().out
    assert generate_main(["--checkpoint", str(hf), *args]) == 0
    assert capsys.readouterr().out == from_original and from_original.startswith(PROMPT)

    results = []
    for source in (ckpt, hf):
        assert evaluate_main(["--checkpoint", str(source), "--data_dir", str(prepared_data["val"]),
                              "--max_samples", "6"]) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert results[0]["tokens"] == results[1]["tokens"] > 0
    assert results[0]["loss"] == pytest.approx(results[1]["loss"], abs=1e-5)
