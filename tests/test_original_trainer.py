"""The trainer continues checkpoints of the original TinyLlama / LLäMmlein trainer (both MLP namings): --init_from
gives the first-step loss of the same weights in our format, --resume continues the step count with the converted
AdamW state in effect (the first update equals the one computed here from that state), and a checkpoint without our
metadata is one clear error. Real trainer subprocesses."""
from __future__ import annotations

import sys

import pytest
import torch
from conftest import ROOT
from original_helpers import save_original, trained_original
from test_trainer import train, train_losses, trainer_args

from lit_gpt.checkpoint.original import load_optimizer_state, load_original_checkpoint

sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="module", params=["swiglu", "xformers_free"])
def original(request, tmp_path_factory):
    """An original checkpoint of the `micro` model after 3 AdamW steps (FSDP layout: names with wrapper prefixes)."""
    model, optimizer = trained_original(request.param)
    return save_original(tmp_path_factory.mktemp("orig") / "iter-00000012-ckpt.pth", model, optimizer, "fsdp")


@pytest.mark.slow
def test_init_from_gives_the_same_first_loss_as_our_format(prepared_data, original, tmp_path):
    ours = tmp_path / "lit_model.pth"
    torch.save({"model": load_original_checkpoint(original, with_optimizer=False).model}, ours)
    train(prepared_data, tmp_path / "a", init_from=original, max_steps=2)
    train(prepared_data, tmp_path / "b", init_from=ours, max_steps=2)
    a, b = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    assert a == pytest.approx(b, abs=1e-6)
    fresh = tmp_path / "fresh"
    train(prepared_data, fresh, max_steps=1)
    assert abs(a[1] - train_losses(fresh)[1]) > 1e-3  # the weights were really loaded


@pytest.mark.slow
def test_resume_takes_the_first_step_the_original_optimizer_state_implies(prepared_data, original, tmp_path):
    from lit_gpt.config import Config
    from lit_gpt.loss import token_losses
    from lit_gpt.model import GPT
    from lit_gpt.packed_dataset import PackedDataset, StepLoader
    from lit_gpt.schedule import LRSchedule
    from pretrain.tinyllama_fabric import make_optimizer, parse_args

    overrides = dict(max_steps=4, grad_clip=0, warmup_steps=0, learning_rate=1e-3)
    result = train(prepared_data, tmp_path, resume=original, **overrides)
    assert "original TinyLlama/LLäMmlein trainer" in result.stdout and "continues at step 3" in result.stdout
    assert sorted(train_losses(tmp_path)) == [4]  # it went on from their step_count 3

    # The reference: our model with the converted weights, our optimizer groups with the converted AdamW state, one
    # step on the trainer's batch of step 3 (sum of token losses over the global batch's real tokens).
    cfg, _, _ = parse_args([f"--{k}={v}" for k, v in (
        arg[2:].split("=", 1) for arg in trainer_args(prepared_data, tmp_path, **overrides)[1:])])
    converted = load_original_checkpoint(original)
    model = GPT(Config.from_name("micro"))
    model.load_state_dict(converted.model)
    optimizer = make_optimizer(model, cfg)
    load_optimizer_state(model, optimizer, converted.optimizer)
    for group in optimizer.param_groups:
        group["lr"] = LRSchedule(cfg.learning_rate, cfg.min_lr, cfg.warmup_steps, cfg.max_steps, cfg.lr_schedule,
                                 cfg.decay_fraction)(3)
    data = PackedDataset([prepared_data["train"]], block_size=128, seed=cfg.seed)
    step, micro_batches = next(iter(StepLoader(data, cfg.global_batch_size, cfg.micro_batch_size, start_step=3)))
    assert step == 3
    real = sum(int((mb["labels"] != -100).sum()) for mb in micro_batches)
    for mb in micro_batches:
        (token_losses(model(mb["input_ids"]), mb["labels"])[1] / real).backward()
    optimizer.step()

    saved = torch.load(tmp_path / "iter-00000004-ckpt.pth", weights_only=True)["model"]
    moved = 0.0
    for name, p in model.named_parameters():
        assert (saved[name] - p.detach()).abs().max().item() <= 1e-6, name
        moved = max(moved, (saved[name] - converted.model[name]).abs().max().item())
    assert moved > 1e-4  # a real update, which a fresh optimizer state would not reproduce (see the library test)


@pytest.mark.slow
def test_a_checkpoint_without_our_metadata_is_one_clear_error(prepared_data, tmp_path):
    bare = tmp_path / "weights.pth"
    train(prepared_data, tmp_path / "run", max_steps=1, save_interval=1)
    state = torch.load(tmp_path / "run" / "iter-00000001-ckpt.pth", weights_only=True)
    torch.save({"model": state["model"], "optimizer": state["optimizer"]}, bare)  # e.g. a hand-made export
    result = train(prepared_data, tmp_path / "resumed", check=False, resume=bare)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "not a checkpoint of this trainer" in errors[0] and "--init_from" in errors[0]
