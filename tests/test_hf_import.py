"""Import from Hugging Face: an HF LlamaForCausalLM built here converts to our format (logits match, config
inferred) and exports back to identical tensors; the QKV split/merge and config inference on their own."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from hf_helpers import ATTENTION_VARIANTS, load_safetensors_dir, small_config

from lit_gpt.config import Config
from lit_gpt.hf_convert import config_from_hf, hf_config, lit_model_shapes, merge_qkv, split_qkv
from lit_gpt.model import GPT
from scripts.convert_hf_checkpoint import main as import_main
from scripts.convert_lit_checkpoint import main as export_main


def build_hf_dir(directory, tokenizer, n_query_groups: int, tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = small_config(n_query_groups)
    hf_cfg = LlamaConfig(**{k: v for k, v in hf_config(config, torch.float32, 1, 2).items()
                            if k not in ("architectures", "model_type", "dtype", "torch_dtype")})
    hf_cfg.tie_word_embeddings = tie
    torch.manual_seed(3)
    model = LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # HF initialises norms to 1: make every tensor distinctive
            p.normal_(0, 0.05) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    model.save_pretrained(directory)
    for f in tokenizer.iterdir():
        shutil.copy(f, directory / f.name)
    return model


@pytest.mark.parametrize("variant", ATTENTION_VARIANTS)
def test_import_round_trips(tmp_path, tokenizer_dir, variant):
    hf_dir, lit_dir, back = tmp_path / "hf", tmp_path / "lit", tmp_path / "back"
    hf = build_hf_dir(hf_dir, tokenizer_dir, ATTENTION_VARIANTS[variant])
    assert import_main(["--hf_dir", str(hf_dir), "--out_dir", str(lit_dir)]) == 0

    ckpt = torch.load(lit_dir / "lit_model.pth", weights_only=True)
    config = Config.from_dict(ckpt["config"])
    assert config.n_query_groups == ATTENTION_VARIANTS[variant] and config.vocab_size == 500
    assert config.padded_vocab_size == 512 and config.name == "hf"
    assert json.loads((lit_dir / "model_config.json").read_text()) == ckpt["config"]
    assert (lit_dir / "tokenizer" / "tokenizer.json").is_file()
    ours = GPT(config).eval()
    ours.load_state_dict(ckpt["model"])  # what the trainer's --init_from does
    idx = torch.randint(0, 500, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(idx) - hf(idx).logits).abs().max().item() <= 1e-4

    assert export_main(["--checkpoint", str(lit_dir / "lit_model.pth"), "--out_dir", str(back), "--dtype", "fp32"]) == 0
    original, exported = hf.state_dict(), load_safetensors_dir(back)
    assert exported.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(exported[name], tensor), name


def test_tied_embeddings_import(tmp_path, tokenizer_dir):
    hf = build_hf_dir(tmp_path / "hf", tokenizer_dir, 2, tie=True)
    assert import_main(["--hf_dir", str(tmp_path / "hf"), "--out_dir", str(tmp_path / "lit"), "--dtype", "bf16"]) == 0
    model = torch.load(tmp_path / "lit" / "lit_model.pth", weights_only=True)["model"]
    assert model["lm_head.weight"].dtype == torch.bfloat16
    assert torch.equal(model["lm_head.weight"], hf.model.embed_tokens.weight.to(torch.bfloat16))


def test_import_bad_inputs(tmp_path, tokenizer_dir, capsys):
    hf_dir = tmp_path / "hf"
    build_hf_dir(hf_dir, tokenizer_dir, 2)
    cfg = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**cfg, "num_key_value_heads": 4}))
    capsys.readouterr()
    assert import_main(["--hf_dir", str(hf_dir), "--out_dir", str(tmp_path / "lit")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --hf_dir {hf_dir}: ") and err.count("\n") == 1
    assert "k_proj.weight has shape [16, 64], config.json implies [32, 64]" in err
    assert import_main(["--hf_dir", str(tmp_path / "nope"), "--out_dir", str(tmp_path / "lit")]) == 2
    assert "--hf_dir" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_import_broken_files_fail_cleanly(tmp_path, tokenizer_dir, capsys):
    # A shard missing or truncated (an interrupted download), a broken index, a config that is no object:
    # one error line naming the file, never a traceback.
    hf_dir = tmp_path / "hf"
    build_hf_dir(hf_dir, tokenizer_dir, 2).save_pretrained(hf_dir, max_shard_size="100KB")
    shards = sorted(hf_dir.glob("model-*.safetensors"))
    assert len(shards) > 2 and (hf_dir / "model.safetensors.index.json").is_file()

    def broken(name, change):
        d = tmp_path / name
        shutil.copytree(hf_dir, d)
        change(d)
        capsys.readouterr()
        assert import_main(["--hf_dir", str(d), "--out_dir", str(tmp_path / "lit")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --hf_dir ") and err.count("\n") == 1, err
        return err

    assert f"{shards[1].name}: cannot read" in broken("missing", lambda d: (d / shards[1].name).unlink())
    assert f"{shards[0].name}: cannot read" in broken("truncated", lambda d: (d / shards[0].name).write_bytes(b"x"))
    index = "model.safetensors.index.json"
    assert f"{index}: not a readable" in broken("no_map", lambda d: (d / index).write_text("{}"))
    assert f"{index}: not a readable" in broken("bad_json", lambda d: (d / index).write_text("{oops"))
    assert "config.json: holds a JSON list" in broken("list", lambda d: (d / "config.json").write_text("[]"))
    assert not (tmp_path / "lit").exists()


def test_import_out_dir_holding_the_input_is_refused(tmp_path, tokenizer_dir, capsys):
    hf_dir = tmp_path / "hf"
    build_hf_dir(hf_dir, tokenizer_dir, 2)
    before = sorted(p.name for p in hf_dir.iterdir())
    for out in (hf_dir, tmp_path):
        capsys.readouterr()
        assert import_main(["--hf_dir", str(hf_dir), "--out_dir", str(out), "--overwrite"]) == 2
        assert f"--out_dir {out}: holds the input --hf_dir" in capsys.readouterr().err
    assert sorted(p.name for p in hf_dir.iterdir()) == before


@pytest.mark.parametrize("variant", ATTENTION_VARIANTS)
def test_qkv_split_merge_inverse(variant):
    config = small_config(ATTENTION_VARIANTS[variant])
    w = torch.randn(config.qkv_size, config.n_embd)
    q, k, v = split_qkv(config, w)
    assert q.shape == (config.n_head * config.head_size, config.n_embd)
    assert k.shape == v.shape == (config.n_query_groups * config.head_size, config.n_embd)
    assert torch.equal(merge_qkv(config, q, k, v), w)
    # Group g's key head sits right after its q_per_kv query heads.
    hs = config.head_size
    assert torch.equal(k[:hs], w[config.q_per_kv * hs:(config.q_per_kv + 1) * hs])


@pytest.mark.parametrize("variant", ATTENTION_VARIANTS)
def test_shape_table_matches_model(variant):
    config = small_config(ATTENTION_VARIANTS[variant])
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in GPT(config).state_dict().items()}
    assert lit_model_shapes(config) == expected


def test_config_inference_picks_registry_names():
    for name in ("LLaMmlein_1B", "LLaMmlein_7B", "micro"):
        named = Config.from_name(name)
        hf = hf_config(named, torch.bfloat16, 1, 2)
        assert config_from_hf(hf, vocab_size=named.vocab_size) == named
    custom = config_from_hf({**hf_config(Config.from_name("micro"), torch.float32, 1, 2), "intermediate_size": 96},
                            name="mine")
    assert custom.name == "mine" and custom.intermediate_size == 96 and custom.padded_vocab_size == 512
    with pytest.raises(ValueError, match="rope"):
        config_from_hf({**hf_config(Config.from_name("micro"), torch.float32, 1, 2),
                        "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}})
