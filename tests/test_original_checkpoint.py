"""Checkpoints of the original TinyLlama / LLäMmlein trainer: weights give the original model's logits, the converted
optimizer state gives the original optimizer's next step, and damaged checkpoints give one clear error."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_script
from original_helpers import (
    LR,
    MODEL_NAME,
    WEIGHT_DECAY,
    batch,
    config,
    loss_of,
    our_optimizer,
    reload_original,
    save_original,
    step,
    trained_original,
)

from lit_gpt.checkpoint.layout import CheckpointError
from lit_gpt.checkpoint.load import load_weights, resolve_config
from lit_gpt.checkpoint.original import is_original_checkpoint, load_optimizer_state, load_original_checkpoint, our_key
from lit_gpt.model import GPT

VARIANTS = [(mlp, layout) for mlp in ("swiglu", "xformers_free") for layout in ("single", "fsdp")]


@pytest.fixture(scope="module", params=VARIANTS, ids=["-".join(v) for v in VARIANTS])
def original(request, tmp_path_factory):
    mlp, layout = request.param
    model, optimizer = trained_original(mlp)
    path = save_original(tmp_path_factory.mktemp("orig") / "iter-00000012-ckpt.pth", model, optimizer, layout)
    return {"mlp": mlp, "layout": layout, "path": path, "model": model.eval()}


def our_model(weights: dict) -> GPT:
    model = GPT(config())
    model.load_state_dict(weights)  # strict: every name maps, nothing is left over
    return model


def test_key_mapping():
    assert our_key("transformer.h.3.mlp.swiglu.w1.weight") == "transformer.h.3.mlp.fc_1.weight"
    assert our_key("_forward_module.transformer.h.3._fsdp_wrapped_module.mlp.w2.weight") == \
        "transformer.h.3.mlp.fc_2.weight"
    assert our_key("transformer.h.0._checkpoint_wrapped_module.mlp.w3.weight") == "transformer.h.0.mlp.proj.weight"
    assert our_key("transformer.h.0.attn.attn.weight") == "transformer.h.0.attn.attn.weight"


def test_weights_give_the_original_logits(original):
    ckpt = load_original_checkpoint(original["path"], with_optimizer=False)
    assert (ckpt.step_count, ckpt.iter_num, ckpt.hparams["model_name"], ckpt.optimizer) == (3, 12, MODEL_NAME, None)
    ours = our_model(ckpt.model).eval()
    idx = batch(7)[:, :-1]
    with torch.no_grad():
        expected, got = original["model"](idx), ours(idx)
    assert (got - expected).abs().max().item() < 1e-5
    # --init_from: the same first-step loss as the original model continuing.
    assert loss_of(ours, batch(7)).item() == pytest.approx(loss_of(original["model"], batch(7)).item(), abs=1e-6)
    assert is_original_checkpoint(original["path"])


def test_optimizer_state_continues_the_original_step(original):
    ckpt = load_original_checkpoint(original["path"])
    assert set(ckpt.optimizer["state"]) == set(ckpt.model)
    theirs, their_optimizer = reload_original(original["path"], original["mlp"])
    before = {our_key(n): p.detach().clone() for n, p in theirs.named_parameters()}
    tokens = batch(11)
    their_loss = step(theirs, their_optimizer, tokens)
    after = {our_key(n): p.detach() for n, p in theirs.named_parameters()}

    # Their one group decays every parameter: with the same decay in both of our groups, every update is theirs.
    ours = our_model(ckpt.model)
    optimizer = our_optimizer(ours, no_decay_weight_decay=WEIGHT_DECAY)
    load_optimizer_state(ours, optimizer, ckpt.optimizer)
    assert step(ours, optimizer, tokens) == pytest.approx(their_loss, abs=1e-6)
    for name, p in ours.named_parameters():
        assert (p.detach() - after[name]).abs().max().item() < 1e-6, name
        assert optimizer.state[p]["step"].item() == 4  # continued from their 3 steps

    # Our default (norms and embedding not decayed) differs from theirs by exactly the decay term on those.
    ours = our_model(ckpt.model)
    optimizer = our_optimizer(ours, no_decay_weight_decay=0.0)
    load_optimizer_state(ours, optimizer, ckpt.optimizer)
    step(ours, optimizer, tokens)
    for name, p in ours.named_parameters():
        undecayed = "norm" in name or "ln_f" in name or "wte" in name
        expected = after[name] + LR * WEIGHT_DECAY * before[name] if undecayed else after[name]
        assert (p.detach() - expected).abs().max().item() < 1e-6, name

    # Without the converted state (a fresh optimizer) the step is far from theirs: the test can fail.
    ours = our_model(ckpt.model)
    optimizer = our_optimizer(ours, no_decay_weight_decay=WEIGHT_DECAY)
    step(ours, optimizer, tokens)
    assert max((p.detach() - after[n]).abs().max().item() for n, p in ours.named_parameters()) > 1e-4


def test_export_path_reads_it_as_ours(original):
    ckpt = load_weights(original["path"])
    assert ckpt["step_count"] == 3 and ckpt["iter_num"] == 12 and ckpt["hparams"]["model_name"] == MODEL_NAME
    assert "transformer.h.0.mlp.fc_1.weight" in ckpt["model"]
    assert resolve_config(ckpt, original["path"]).name == MODEL_NAME  # from hparams["model_name"]
    assert resolve_config(ckpt, original["path"], "micro").name == MODEL_NAME


# ------------------------------------------------------------------ bad input
def rewrite(path, tmp_path, change):
    state = torch.load(path, weights_only=True)
    change(state)
    out = tmp_path / "damaged.pth"
    torch.save(state, out)
    return out


def first_key(mapping):
    return next(iter(mapping))


DAMAGES = {
    "no step_count": (lambda s: s.pop("step_count"), "field 'step_count' missing"),
    "iter_num text": (lambda s: s.update(iter_num="12"), "field 'iter_num' '12' is not a count"),
    "steps > iters": (lambda s: s.update(step_count=99), "step_count 99 exceeds iter_num 12"),
    "no hparams": (lambda s: s.pop("hparams"), "field 'hparams' missing"),
    "no optimizer": (lambda s: s.pop("optimizer"), "no 'optimizer' entry"),
    "optimizer junk": (lambda s: s.update(optimizer=[1, 2]), "field 'optimizer' is not an optimizer state dict"),
    "moment missing": (lambda s: s["optimizer"]["state"][first_key(s["optimizer"]["state"])].pop("exp_avg_sq"),
                       "'exp_avg_sq' missing (an AdamW state is expected)"),
    "moment shape": (lambda s: s["optimizer"]["state"][first_key(s["optimizer"]["state"])].update(
        exp_avg=torch.zeros(3)), "'exp_avg' has shape [3]"),
    "state missing": (lambda s: s["optimizer"]["state"].pop(first_key(s["optimizer"]["state"])),
                      "optimizer.state has no entry for"),
    "group short": (lambda s: s["optimizer"]["param_groups"][0]["params"].pop(), "optimizer.param_groups"),
    "not a tensor": (lambda s: s["model"].update({first_key(s["model"]): "x"}), "is a str, not a tensor"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_checkpoint_is_one_clear_error(original, tmp_path, damage):
    change, message = DAMAGES[damage]
    path = rewrite(original["path"], tmp_path, change)
    with pytest.raises(CheckpointError) as error:
        load_original_checkpoint(path)
    assert str(error.value).startswith(f"{path}: ") and message in str(error.value)


def test_not_an_original_checkpoint(tmp_path):
    ours = tmp_path / "ours.pth"
    torch.save({"model": GPT(config()).state_dict(), "step_count": 1}, ours)
    junk = tmp_path / "junk.pth"
    junk.write_text("junk")
    assert not is_original_checkpoint(ours) and not is_original_checkpoint(junk)
    assert not is_original_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="not a checkpoint of the original"):
        load_original_checkpoint(ours)
    with pytest.raises(CheckpointError, match="junk.pth: not a readable torch checkpoint"):
        load_original_checkpoint(junk)


def test_unknown_model_name_asks_for_model_name(original, tmp_path):
    path = rewrite(original["path"], tmp_path, lambda s: s["hparams"].update(model_name="LLaMmlein_3B"))
    ckpt = load_weights(path)
    with pytest.raises(CheckpointError, match="pass --model_name"):
        resolve_config(ckpt, path)
    assert resolve_config(ckpt, path, "micro").name == "micro"
    with pytest.raises(CheckpointError, match="--model_name demo_5M: config demo_5M does not match the weights"):
        resolve_config(ckpt, path, "demo_5M")


# ------------------------------------------------------------------ real FSDP, both ways
WRITE_WITH_FSDP = r"""
import os, sys, torch
sys.path[:0] = [{root!r}, {tests!r}]
import torch.distributed as dist
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from original_helpers import HPARAMS, Block, OriginalGPT, batch, config, step, their_optimizer

# Their multi-GPU setup on one CPU rank: FSDP over Blocks, activation checkpointing (hence the xformers-free MLP),
# their AdamW, and the full state dicts fabric.save writes with state_dict_type="full".
dist.init_process_group("gloo", init_method="file://" + sys.argv[2] + ".store", rank=0, world_size=1)
torch.manual_seed(0)
reference = OriginalGPT(config(), "xformers_free")
model = FSDP(OriginalGPT(config(), "xformers_free"), auto_wrap_policy=ModuleWrapPolicy({{Block}}),
             device_id=torch.device("cpu"))
model.load_state_dict(reference.state_dict())
apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, Block))
optimizer = their_optimizer(model)
for i in range(3):
    step(model, optimizer, batch(100 + i))
options = (FullStateDictConfig(rank0_only=False), FullOptimStateDictConfig(rank0_only=False))
with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, *options):
    state = {{"model": model.state_dict(), "optimizer": FSDP.optim_state_dict(model, optimizer)}}
torch.save({{**state, "hparams": HPARAMS, "iter_num": 12, "step_count": 3}}, sys.argv[1])
dist.destroy_process_group()
"""

LOAD_UNDER_FABRIC = r"""
import sys, torch
sys.path[:0] = [{root!r}, {tests!r}]
from lightning.fabric import Fabric
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from lit_gpt.distributed import make_strategy
from lit_gpt.model import GPT
from lit_gpt.checkpoint.original import load_optimizer_state, load_original_checkpoint
from original_helpers import WEIGHT_DECAY, batch, config, loss_of, our_optimizer

checkpoint, out, kind = sys.argv[1:4]
fabric = Fabric(accelerator="cpu", devices=2, strategy=make_strategy(kind, world_size=2))
fabric.launch()
ckpt = load_original_checkpoint(checkpoint)
model = GPT(config())
model.load_state_dict(ckpt.model)
model = fabric.setup_module(model)
optimizer = fabric.setup_optimizers(our_optimizer(model, no_decay_weight_decay=WEIGHT_DECAY))
load_optimizer_state(model, optimizer, ckpt.optimizer)
rank = fabric.global_rank
fabric.backward(loss_of(model, batch(11)[2 * rank:2 * rank + 2]))  # the halves average to the whole batch's gradient
optimizer.step()
weights = get_model_state_dict(model._forward_module, options=StateDictOptions(full_state_dict=True))
if rank == 0:
    torch.save(weights, out)
"""


@pytest.fixture(scope="module")
def fsdp_written(tmp_path_factory) -> Path:
    """An original checkpoint as their FSDP runs wrote it: optimizer state by name, one shared "step" per unit."""
    base = tmp_path_factory.mktemp("fsdp_written")
    script = base / "write.py"
    script.write_text(WRITE_WITH_FSDP.format(root=str(ROOT), tests=str(ROOT / "tests")))
    checkpoint = base / "iter-00000012-ckpt.pth"
    run_script(str(script), str(checkpoint), str(base / "pg"))
    return checkpoint


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fsdp", "fsdp2"])
def test_fsdp_written_checkpoint_resumes_under_fabric(fsdp_written, tmp_path, kind):
    state = torch.load(fsdp_written, weights_only=True)["optimizer"]["state"]
    assert isinstance(next(iter(state)), str) and len({id(s["step"]) for s in state.values()}) < len(state)

    theirs, their_optimizer = reload_original(fsdp_written, "xformers_free")
    step(theirs, their_optimizer, batch(11))
    after = {our_key(n): p.detach() for n, p in theirs.named_parameters()}
    script = tmp_path / "load.py"
    script.write_text(LOAD_UNDER_FABRIC.format(root=str(ROOT), tests=str(ROOT / "tests")))
    run_script(str(script), str(fsdp_written), str(tmp_path / "after.pt"), kind)
    ours = torch.load(tmp_path / "after.pt", weights_only=True)
    assert ours.keys() == after.keys()
    for name, tensor in ours.items():
        assert (tensor - after[name]).abs().max().item() < 1e-6, name
