"""Export to Hugging Face: loads with transformers and matches our logits (MHA/GQA/MQA), shards, dtypes, sharded
training checkpoints, and clean failures on bad input."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, run_script
from hf_helpers import ATTENTION_VARIANTS, load_safetensors_dir, random_state, small_config, write_run_dir

from lit_gpt.hf_convert import lit_to_hf
from lit_gpt.model import GPT
from scripts.convert_lit_checkpoint import main as convert_main
from scripts.convert_lit_checkpoint import parse_size


def hf_model(directory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, local_files_only=True).eval()


@pytest.mark.parametrize("variant", ATTENTION_VARIANTS)
def test_export_matches_transformers(tmp_path, tokenizer_dir, variant):
    config = small_config(ATTENTION_VARIANTS[variant])
    state = random_state(config)
    ckpt = write_run_dir(tmp_path / "run", config, tokenizer_dir, state)
    out = tmp_path / "hf"
    assert convert_main(["--checkpoint", str(ckpt), "--out_dir", str(out), "--dtype", "fp32", "--verify"]) == 0

    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "README.md", "tokenizer.model",
            "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left
    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["num_key_value_heads"] == ATTENTION_VARIANTS[variant]

    ours = GPT(config).eval()
    ours.load_state_dict(state)
    idx = torch.randint(0, config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (hf_model(out)(idx).logits - ours(idx)).abs().max().item()
    assert diff <= 1e-4

    card = (out / "README.md").read_text()
    assert "| optimizer steps | 10 |" in card and "train_0000000000.bin" in card and "max abs diff" in card
    assert "\n# hf\n" in card  # titled after --out_dir, not the temp dir it was written in
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["suppress_tokens"] == list(range(500, 512))  # padded lm_head rows


def test_bf16_sharded_export(tmp_path, tokenizer_dir):
    config = small_config(2)
    state = random_state(config)
    ckpt = write_run_dir(tmp_path / "run", config, tokenizer_dir, state)
    out = tmp_path / "hf"
    assert convert_main(["--checkpoint", str(ckpt), "--out_dir", str(out), "--max_shard_size", "40KB", "--verify"]) == 0

    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(out.glob("model-*.safetensors"))
    assert len(files) > 3 and set(index["weight_map"].values()) == {f.name for f in files}
    exported = load_safetensors_dir(out)
    expected = {n: t.to(torch.bfloat16) for k, v in state.items() for n, t in lit_to_hf(config, k, v).items()}
    assert exported.keys() == expected.keys() == index["weight_map"].keys()
    for name, tensor in expected.items():
        assert exported[name].dtype == torch.bfloat16 and torch.equal(exported[name], tensor), name
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in expected.values())
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_wrapper_prefixes_are_stripped(tmp_path, tokenizer_dir):
    config = small_config(2)
    state = random_state(config)
    wrapped = {f"_forward_module._orig_mod.{k}".replace(".attn.", "._checkpoint_wrapped_module.attn."): v
               for k, v in state.items()}
    for name, sd in (("plain", state), ("wrapped", wrapped)):
        ckpt = write_run_dir(tmp_path / name, config, tokenizer_dir, sd)
        assert convert_main(["--checkpoint", str(ckpt), "--out_dir", str(tmp_path / f"hf_{name}")]) == 0
    plain, other = load_safetensors_dir(tmp_path / "hf_plain"), load_safetensors_dir(tmp_path / "hf_wrapped")
    assert plain.keys() == other.keys() and all(torch.equal(plain[k], other[k]) for k in plain)


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_export_honours_the_umask(tmp_path, tokenizer_dir, umask, file_mode, dir_mode):
    # safetensors writes its files 0600 whatever the umask: a colleague could not read the weights.
    import os
    import stat

    config = small_config(2)
    ckpt = write_run_dir(tmp_path / "run", config, tokenizer_dir, random_state(config))
    out = tmp_path / "hf"
    previous = os.umask(umask)
    try:
        assert convert_main(["--checkpoint", str(ckpt), "--out_dir", str(out), "--max_shard_size", "40KB"]) == 0
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert len([n for n in modes if n.endswith(".safetensors")]) > 3 and "tokenizer.model" in modes
    assert modes == dict.fromkeys(modes, file_mode) and stat.S_IMODE(out.stat().st_mode) == dir_mode


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("1234") == 1234
    assert parse_size("1.5MB") == 1_500_000


# ------------------------------------------------------------------ bad input
def _expect_error(capsys, argv, *fragments):
    assert convert_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_model_name_mismatch_fails_cleanly(tmp_path, tokenizer_dir, capsys):
    config = small_config(2)
    ckpt = write_run_dir(tmp_path / "run", config, tokenizer_dir, random_state(config))
    out = tmp_path / "hf"
    _expect_error(capsys, ["--checkpoint", str(ckpt), "--out_dir", str(out), "--model_name", "micro"],
                  "--model_name micro", "n_head=8 (named: 4)")
    # Without a recorded config, the shapes decide.
    state = torch.load(ckpt, weights_only=True)
    state.pop("config")
    torch.save(state, ckpt)
    (ckpt.parent / "model_config.json").unlink()
    _expect_error(capsys, ["--checkpoint", str(ckpt), "--out_dir", str(out), "--model_name", "micro"],
                  "--model_name micro", "does not match the weights")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.parametrize("field, value, message", [
    ("config", "junk", "field 'config': holds a str, not a model config"),
    ("config", {"n_layer": 2, "n_head": 8, "n_embd": 60}, "field 'config': not a valid model config"),
])
def test_malformed_metadata_fails_cleanly(tmp_path, tokenizer_dir, capsys, field, value, message):
    config = small_config(2)
    ckpt = write_run_dir(tmp_path / "run", config, tokenizer_dir, random_state(config))
    state = torch.load(ckpt, weights_only=True)
    torch.save({**state, field: value, "data": ["not", "a", "dict"], "hparams": "junk"}, ckpt)
    _expect_error(capsys, ["--checkpoint", str(ckpt), "--out_dir", str(tmp_path / "hf")], str(ckpt), message)
    # Fields only shown in the model card may be anything: the export goes on.
    torch.save({**state, "data": ["not", "a", "dict"], "hparams": "junk", "step_count": "ten"}, ckpt)
    assert convert_main(["--checkpoint", str(ckpt), "--out_dir", str(tmp_path / "hf")]) == 0


def test_missing_tokenizer_fails_cleanly(tmp_path, tokenizer_dir, capsys):
    config = small_config(2)
    ckpt = write_run_dir(tmp_path / "run", config, tokenizer_dir, random_state(config))
    out = tmp_path / "hf"
    _expect_error(capsys, ["--checkpoint", str(ckpt), "--out_dir", str(out), "--tokenizer", str(tmp_path / "nope")],
                  "--tokenizer", "not found")
    for f in (ckpt.parent / "tokenizer").iterdir():
        f.unlink()
    _expect_error(capsys, ["--checkpoint", str(ckpt), "--out_dir", str(out)], "tokenizer", "--tokenizer DIR")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_existing_output_needs_overwrite(tmp_path, tokenizer_dir, capsys):
    config = small_config(1)
    ckpt = write_run_dir(tmp_path / "run", config, tokenizer_dir, random_state(config))
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _expect_error(capsys, ["--checkpoint", str(ckpt), "--out_dir", str(out)], str(out), "--overwrite")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert convert_main(["--checkpoint", str(ckpt), "--out_dir", str(out), "--overwrite"]) == 0
    assert (out / "model.safetensors").is_file() and not (out / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "run"]


def test_out_dir_holding_the_input_is_refused(tmp_path, tokenizer_dir, capsys):
    # Replacing the run directory (or the tokenizer) with the export would delete the checkpoint being exported.
    config = small_config(2)
    ckpt = write_run_dir(tmp_path / "run", config, tokenizer_dir, random_state(config))
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    for out, flag in ((tmp_path / "run", "--checkpoint"), (tmp_path, "--checkpoint"),
                      (tmp_path / "run" / "tokenizer", "tokenizer")):
        _expect_error(capsys, ["--checkpoint", str(ckpt), "--out_dir", str(out), "--overwrite"],
                      f"--out_dir {out}: holds the input {flag}")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_training_attn_impl_does_not_bind_the_export(tmp_path, tokenizer_dir):
    # A run trained with --attn_impl fa3 on H100 records it in its config; verifying (and generating, evaluating)
    # on a CPU must still work: the kernel is a runtime choice, not part of the weights.
    config = small_config(2, attn_impl="fa3")
    ckpt = write_run_dir(tmp_path / "run", config, tokenizer_dir, random_state(config))
    assert convert_main(["--checkpoint", str(ckpt), "--out_dir", str(tmp_path / "hf"), "--dtype", "fp32",
                         "--verify"]) == 0
    from lit_gpt.checkpoint.load import load_gpt

    model, loaded, *_ = load_gpt(ckpt)  # what generate.py and evaluate.py use
    assert loaded.attn_impl == "auto" and model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 512)


def test_failed_verification_leaves_nothing(tmp_path, tokenizer_dir, capsys, monkeypatch):
    import scripts.convert_lit_checkpoint as convert

    config = small_config(2)
    ckpt = write_run_dir(tmp_path / "run", config, tokenizer_dir, random_state(config))
    monkeypatch.setattr(convert, "VERIFY_TOLERANCE", -1.0)  # nothing can pass
    _expect_error(capsys, ["--checkpoint", str(ckpt), "--out_dir", str(tmp_path / "hf"), "--verify"], "--verify")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.slow  # scripts/create.sh end to end: a shell and a Python process that imports torch and transformers
def test_create_sh_verifies_by_default(tmp_path, tokenizer_dir):
    config = small_config(2)
    ckpt = write_run_dir(tmp_path / "run", config, tokenizer_dir, random_state(config))
    result = subprocess.run(["bash", "scripts/create.sh", str(ckpt), str(tmp_path / "hf"), "--dtype", "fp32"],
                            cwd=ROOT, capture_output=True, text=True, env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin",
                                                                          "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert "verified: logits max abs diff" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["single", "fsdp"])
def test_create_sh_exports_an_original_checkpoint(tmp_path, tokenizer_dir, layout):
    # The original trainer's checkpoint: xformers MLP names, its own metadata, no config and no tokenizer beside it.
    from original_helpers import save_original, trained_original

    model, optimizer = trained_original("swiglu")
    ckpt = save_original(tmp_path / "orig" / "iter-00000012-ckpt.pth", model, optimizer, layout)
    out = tmp_path / "hf"
    result = subprocess.run(["bash", "scripts/create.sh", str(ckpt), str(out), "--dtype", "fp32", "--tokenizer",
                             str(tokenizer_dir)], cwd=ROOT, capture_output=True, text=True,
                            env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert "verified: logits max abs diff" in result.stdout
    idx = torch.randint(0, 500, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (hf_model(out)(idx).logits - model.eval()(idx)).abs().max().item() <= 1e-4
    card = (out / "README.md").read_text()
    assert "| optimizer steps | 3 |" in card and "| micro-batch iterations | 12 |" in card and '"model_name": "micro"' in card


def test_export_with_the_llammlein_tokenizer_layout_verifies(tmp_path):
    # tokenizer.json with added tokens and add_prefix_space false beside tokenizer.model: ours must encode as the
    # export's AutoTokenizer does (it used to prefer the .model file, and --verify refused the export).
    import json

    from conftest import write_corpus
    from hf_helpers import llammlein_like_tokenizer

    corpus = write_corpus(tmp_path / "corpus", n_docs=300)
    texts = [json.loads(line)["text"] for line in corpus.read_text(encoding="utf-8").splitlines()]
    tokenizer = llammlein_like_tokenizer(texts, tmp_path / "tokenizer", vocab_size=400)
    config = small_config(2, vocab_size=410)
    ckpt = write_run_dir(tmp_path / "run", config, tokenizer, random_state(config))
    assert convert_main(["--checkpoint", str(ckpt), "--out_dir", str(tmp_path / "hf"), "--dtype", "fp32",
                         "--verify"]) == 0
    from transformers import AutoTokenizer

    exported = AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    assert {400, 401, 407, 408} <= set(exported("a\tb\n{c}")["input_ids"])  # the added tokens survive the export


def test_original_checkpoint_with_an_unknown_model_needs_model_name(tmp_path, tokenizer_dir, capsys):
    from original_helpers import save_original, trained_original

    model, optimizer = trained_original("xformers_free")
    ckpt = save_original(tmp_path / "orig" / "iter-00000012-ckpt.pth", model, optimizer, "single")
    state = torch.load(ckpt, weights_only=True)
    state["hparams"]["model_name"] = "LLaMmlein_3B"  # a config of theirs that is not registered here
    torch.save(state, ckpt)
    argv = ["--checkpoint", str(ckpt), "--out_dir", str(tmp_path / "hf"), "--tokenizer", str(tokenizer_dir)]
    _expect_error(capsys, argv, str(ckpt), "pass --model_name")
    assert convert_main([*argv, "--model_name", "micro", "--verify", "--dtype", "fp32"]) == 0


# ------------------------------------------------------------------ sharded training checkpoints
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # a one-process save, on purpose
def test_damaged_sharded_checkpoint_fails_cleanly(tmp_path, tokenizer_dir, capsys):
    import shutil

    import torch.distributed.checkpoint as dcp

    config = small_config(2)
    state = random_state(config)
    write_run_dir(tmp_path / "run", config, tokenizer_dir)
    good = tmp_path / "run" / "iter-00000010-ckpt.pth"
    dcp.save({"model": state}, checkpoint_id=good, no_dist=True)
    torch.save({"step_count": 10, "config": config.to_dict()}, good / "meta.pt")
    assert convert_main(["--checkpoint", str(good), "--out_dir", str(tmp_path / "hf"), "--dtype", "fp32"]) == 0
    assert all(torch.equal(load_safetensors_dir(tmp_path / "hf")[n], t)
               for k, v in state.items() for n, t in lit_to_hf(config, k, v).items())

    def damaged(name, change, *fragments):
        ckpt = tmp_path / "run" / name
        shutil.copytree(good, ckpt)
        change(ckpt)
        _expect_error(capsys, ["--checkpoint", str(ckpt), "--out_dir", str(tmp_path / "out")], str(ckpt), *fragments)

    shard = next(good.glob("*.distcp")).name
    damaged("no-shard", lambda c: (c / shard).unlink(), f"shard file {shard} is missing or truncated")
    damaged("truncated", lambda c: (c / shard).write_bytes(b"x"), f"shard file {shard} is missing or truncated")
    damaged("bad-meta", lambda c: (c / "meta.pt").write_text("junk"), "meta.pt: not a readable torch file")
    damaged("bad-metadata", lambda c: (c / ".metadata").write_text("junk"), ".metadata: unreadable")
    assert not (tmp_path / "out").exists()


SHARDED_SCRIPT = r"""
import sys, torch
sys.path[:0] = [{root!r}, {tests!r}]
from lightning.fabric import Fabric
from hf_helpers import random_state, small_config
from lit_gpt.checkpoint.save import save_checkpoint
from lit_gpt.distributed import make_strategy
from lit_gpt.model import GPT

out, kind = sys.argv[1], sys.argv[2]
config = small_config(2)
strategy = make_strategy(kind, world_size=2)
fabric = Fabric(accelerator="cpu", devices=2, strategy=strategy)
fabric.launch()
model = GPT(config)
model.load_state_dict(random_state(config))
model = fabric.setup_module(model)
optimizer = fabric.setup_optimizers(torch.optim.AdamW(model.parameters(), lr=1e-3))
loss = model(torch.randint(0, 500, (2, 16))).float().logsumexp(-1).mean()
fabric.backward(loss)
optimizer.step()  # moves the weights and creates optimizer state that the export must skip
meta = dict(step_count=1, iter_num=1, tokens_seen=64, hparams={{}}, config=config.to_dict(), data={{}})
save_checkpoint(out + "/iter-00000001-ckpt.pth", model, optimizer, meta, "sharded")
fabric.save(out + "/fabric-sharded", {{"model": model, "optimizer": optimizer, "iter_num": 1}})
save_checkpoint(out + "/full/iter-00000001-ckpt.pth", model, optimizer, meta, "full")
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fsdp", "fsdp2"])
def test_sharded_checkpoint_exports_like_full(tmp_path, tokenizer_dir, kind):
    config = small_config(2)
    run = tmp_path / "run"
    (run / "full").mkdir(parents=True)
    for d in (run, run / "full"):
        write_run_dir(d, config, tokenizer_dir)  # tokenizer + model_config.json, as the trainer leaves them
    script = tmp_path / "write_sharded.py"
    script.write_text(SHARDED_SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests")))
    run_script(str(script), str(run), kind)
    sharded, full = run / "iter-00000001-ckpt.pth", run / "full" / "iter-00000001-ckpt.pth"
    assert sharded.is_dir() and full.is_file()

    exports = {}
    for name, ckpt in (("sharded", sharded), ("full", full), ("fabric", run / "fabric-sharded")):
        # Fabric's own layout records no config: it comes from model_config.json beside the checkpoint.
        assert convert_main(["--checkpoint", str(ckpt), "--out_dir", str(tmp_path / name), "--dtype", "fp32"]) == 0
        exports[name] = load_safetensors_dir(tmp_path / name)
    untrained = {n: t for k, v in random_state(config).items() for n, t in lit_to_hf(config, k, v).items()}
    assert exports["full"].keys() == exports["sharded"].keys() == exports["fabric"].keys() == untrained.keys()
    for name, tensor in exports["full"].items():
        assert torch.equal(exports["sharded"][name], tensor), name
        assert torch.equal(exports["fabric"][name], tensor), name
    assert any(not torch.equal(exports["full"][n], untrained[n]) for n in untrained)  # the step moved weights


def test_export_to_a_full_disk_is_one_error_and_keeps_the_old_export(tmp_path, tokenizer_dir, capsys, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    config = small_config(1)
    ckpt = write_run_dir(tmp_path / "run", config, tokenizer_dir, random_state(config))
    out = tmp_path / "hf"
    assert convert_main(["--checkpoint", str(ckpt), "--out_dir", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()

    def full_disk(tensors, filename, metadata=None):  # what safetensors raises when the write meets a full disk
        raise SafetensorError('Error while serializing: I/O error: No space left on device (os error 28): '
                              'IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    err = _expect_error(capsys, ["--checkpoint", str(ckpt), "--out_dir", str(out), "--overwrite"],
                        f"--out_dir {out}: no space left on device (writing ", "model.safetensors")
    assert "Traceback" not in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "run"]


@pytest.mark.parametrize("where", ["loop", "loop/hf"])
def test_symlink_loop_as_out_dir_is_one_error(tmp_path, tokenizer_dir, capsys, where):
    config = small_config(1)
    ckpt = write_run_dir(tmp_path / "run", config, tokenizer_dir, random_state(config))
    (tmp_path / "loop").symlink_to("loop")
    _expect_error(capsys, ["--checkpoint", str(ckpt), "--out_dir", str(tmp_path / where)],
                  f"--out_dir {tmp_path / where}: Too many levels of symbolic links")
    result = subprocess.run(["bash", "scripts/create.sh", str(ckpt), str(tmp_path / where)], cwd=ROOT,
                            capture_output=True, text=True, env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin",
                                                                 "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert result.returncode == 2 and result.stderr.startswith(f"error: --out_dir {tmp_path / where}: Too many"), \
        result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
