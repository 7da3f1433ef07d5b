"""Hostile settings, checked without training: YAML files of absurd size, nulls and long values, seeds beyond what
numpy takes, multi-node runs without a launcher, block sizes beyond the model or the data, symlink loops as output
directories and an exported model as --resume. Each is one InputError naming the flag, raised quickly."""
from __future__ import annotations

import os
import resource
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from test_packed_dataset import write_litpkds

from lit_gpt.checkpoint.publish import check_output_path
from lit_gpt.errors import InputError
from lit_gpt.packed_dataset import PackedDataset
from lit_gpt.preflight import check_one_sample, resolve_world
from lit_gpt.resume import check_out_dir
from pretrain.tinyllama_fabric import parse_args, resolve


def alias_bomb(levels: int = 8, width: int = 9) -> str:
    """A YAML value of a few hundred bytes that expands to width**levels strings."""
    value = "&a0 [" + ", ".join(["lol"] * width) + "]"
    for level in range(1, levels):
        value = f"&a{level} [{value}, " + ", ".join([f"*a{level - 1}"] * (width - 1)) + "]"
    return value


def test_an_alias_bomb_is_refused_before_it_is_expanded(tmp_path):
    config = tmp_path / "bomb.yaml"
    config.write_text(f"wandb_tags: {alias_bomb()}\n")  # 9**8 = 43 million strings from 400 bytes
    assert config.stat().st_size < 1000
    peak_before, start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
    with pytest.raises(InputError) as info:
        parse_args(["--config", str(config)])
    assert time.perf_counter() - start < 5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 200_000  # KiB: nothing was expanded
    assert str(info.value).startswith(f"--config {config}: expands to more than 10,000 values")
    with pytest.raises(InputError, match="expands to more than"):  # the same YAML given inline
        parse_args(["--config", f"{{wandb_tags: {alias_bomb()}}}"])


def test_oversized_or_deeply_nested_settings_are_refused(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("wandb_name: " + "x" * (2 << 20) + "\n")
    with pytest.raises(InputError, match=rf"^--config {big}: 2,097,165 bytes; a settings file is at most 1,048,576"):
        parse_args(["--config", str(big)])
    deep = tmp_path / "deep.yaml"
    deep.write_text("wandb_name: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(InputError, match=rf"^--config {deep}: "):
        parse_args(["--config", str(deep)])


def test_a_long_value_of_the_wrong_shape_is_quoted_by_its_start(tmp_path):
    config = tmp_path / "list.yaml"
    config.write_text("out_dir: [" + ", ".join(["1234567890"] * 5000) + "]\n")  # 60 KB, 5001 values: allowed size
    with pytest.raises(InputError) as info:
        parse_args(["--config", str(config)])
    message = str(info.value)
    assert message.startswith(f"--config {config}: out_dir: Expected a <class 'str'>") and "..." in message
    assert len(message) < 400


@pytest.mark.parametrize("yaml_text,flag", [("wandb_name: null\n", "--wandb_name"),
                                            ("train_data_dir: ~\n", "--train_data_dir"),
                                            ("max_steps: null\n", "--max_steps")])
def test_a_null_is_not_a_value(tmp_path, yaml_text, flag):
    config = tmp_path / "null.yaml"
    config.write_text(yaml_text)
    with pytest.raises(InputError, match=f"^{flag} must be a (str|int), got null"):
        parse_args(["--config", str(config)])


def test_shapes_and_keys_of_yaml_values(tmp_path):
    for text, expected in [("1: 2\n", "Key must be a string"), ("out_dir: [1, 2]\n", "out_dir: Expected a"),
                           ("wandb_tags: {a: 1}\n", "wandb_tags: Expected a")]:
        config = tmp_path / "c.yaml"
        config.write_text(text)
        with pytest.raises(InputError, match=expected):
            parse_args(["--config", str(config)])


@pytest.mark.parametrize("seed", ["-1", "99999999999999", "4294967296"])
def test_seed_outside_what_numpy_and_lightning_take(seed):
    with pytest.raises(InputError, match=f"^--seed must be >= 0 and <= 4294967295, got {seed}$"):
        parse_args(["--seed", seed])
    assert parse_args(["--seed", "4294967295"])[0].seed == np.iinfo(np.uint32).max  # the largest they take


def test_block_size_above_the_named_model(tmp_path):
    with pytest.raises(InputError, match="^--block_size 129 is above micro's context length 128$"):
        resolve(["--model_name", "micro", "--block_size", "129"])
    assert resolve(["--model_name", "micro", "--block_size", "64"])[1].block_size == 64


def test_block_size_above_the_data(tmp_path):
    write_litpkds(tmp_path / "x_0000000000.bin", np.arange(100) + 5)
    check_one_sample(PackedDataset([tmp_path], block_size=99), "train_data_dir")  # 100 tokens: one whole sample
    with pytest.raises(InputError, match=rf"^--block_size 100: {tmp_path} holds 100 tokens, fewer than one sample "
                                         rf"\(101\) of --train_data_dir$"):
        check_one_sample(PackedDataset([tmp_path], block_size=100), "train_data_dir")


def test_several_nodes_need_a_launcher(monkeypatch):
    for name in list(os.environ):
        if name.startswith(("SLURM_", "TORCHELASTIC_")) or name in ("RANK", "LOCAL_RANK", "GROUP_RANK",
                                                                     "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR"):
            monkeypatch.delenv(name)
    cfg = parse_args(["--num_nodes", "2", "--accelerator", "cpu", "--devices", "1"])[0]
    with pytest.raises(InputError, match=r"^--num_nodes 2: a multi-node run needs a launcher .*srun .*torchrun"):
        resolve_world(cfg)
    monkeypatch.setenv("NODE_RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "node-a")  # Lightning's manual launch: one command per node
    assert resolve_world(cfg) == ("cpu", 1, 2, "local")


def test_process_group_timeout_is_set():
    from lit_gpt.distributed import make_strategy

    cfg = parse_args([])[0]
    assert cfg.dist_timeout_s == 1800
    for kind in ("ddp", "fsdp", "fsdp2"):
        assert make_strategy(kind, 2, timeout=timedelta(seconds=42))._timeout == timedelta(seconds=42), kind


@pytest.mark.parametrize("where", ["loop", "loop/sub", "dangling"])
def test_unusable_output_paths(tmp_path, where):
    (tmp_path / "loop").symlink_to("loop")
    (tmp_path / "dangling").symlink_to("nowhere")
    with pytest.raises(InputError, match=rf"^--out_dir {tmp_path / where}: "
                                         r"(Too many levels of symbolic links|a symlink to nowhere)"):
        check_output_path(tmp_path / where, "--out_dir")
    check_output_path(tmp_path / "new", "--out_dir")  # absent: fine
    check_output_path(tmp_path, "--out_dir")


def test_an_exported_model_as_resume_is_one_error_without_a_checksum_note(tmp_path, capsys):
    export = tmp_path / "hf"
    export.mkdir()
    (export / "config.json").write_text("{}")
    (export / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(InputError, match=rf"^--resume {export}: not a checkpoint of this trainer"):
        check_out_dir(tmp_path / "out", str(export))
    assert capsys.readouterr().err == ""


def test_unwritable_metrics_refused_before_anything_changes(tmp_path, monkeypatch):
    from lit_gpt.preflight import check_inputs

    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: not Path(path).name.startswith("metrics.") and real_access(path, mode))
    cfg, config, *_ = resolve(["--model_name", "micro", "--out_dir", str(tmp_path), "--tokenizer_path", "",
                               "--resume", "auto", "--global_batch_size", "8", "--micro_batch_size", "2"])
    with pytest.raises(InputError, match=rf"^--out_dir {tmp_path}: {tmp_path / 'metrics.jsonl'} is not writable"):
        check_inputs(cfg, config, 1)
    assert Path(tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n'
