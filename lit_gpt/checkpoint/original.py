"""Checkpoints written by the original TinyLlama / LLäMmlein trainer, read as ours.

That trainer saves `fabric.save(path, {"model", "optimizer", "hparams", "iter_num", "step_count"})` and nothing else:

- "model": lit-gpt parameter names, except the MLP. xformers' `SwiGLU` (`mlp.swiglu.w1/w2/w3`) or the xformers-free
  MLP that its activation checkpointing switches to (`mlp.w1/w2/w3`); both compute w3(silu(w1 x) * w2 x), ours
  proj(silu(fc_1 x) * fc_2 x), so w1 -> fc_1, w2 -> fc_2, w3 -> proj. Names may carry wrapper prefixes (Fabric's
  `_forward_module.`, FSDP's `_fsdp_wrapped_module.`, `_checkpoint_wrapped_module.`). Attention, norms and RoPE
  are laid out as ours.
- "optimizer": one AdamW param group over `model.parameters()`. Multi-GPU runs (FSDP, full state dict) store
  `FSDP.optim_state_dict`: state and groups keyed by parameter name. A one-device run stores
  `optimizer.state_dict()`: keyed by the parameter's position in `model.parameters()`, which is the order of the
  model's state-dict keys (that model has no buffers).
- "hparams": the settings of their trainer (`model_name`, `global_batch_size`, `gradient_accumulation_steps`, ...).
- "iter_num" counts micro-batches (the number in their file names), "step_count" optimizer steps.

There is no model config (it comes from `--model_name` or `hparams["model_name"]`), no data position and no RNG
state: their loader's order cannot be reproduced, so a resumed run continues the step count and optimizer state on
this toolkit's own sample order.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

import torch

from lit_gpt.checkpoint.layout import CheckpointError, clean_key
from lit_gpt.config import Config, name_to_config

_ORIGINAL_MLP = re.compile(r"^(transformer\.h\.\d+\.mlp\.)(?:swiglu\.)?(w[123])\.weight$")
MLP_NAMES = {"w1": "fc_1", "w2": "fc_2", "w3": "proj"}
ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


class OriginalCheckpoint(NamedTuple):
    model: dict[str, torch.Tensor]  # our parameter names
    # {"state": {our name: {...}}, "param_groups": [{..., "params": [our names]}]}; None: not read, or never stepped
    optimizer: dict | None
    step_count: int
    iter_num: int
    hparams: dict[str, Any]


def our_key(key: str) -> str:
    """A parameter name of the original model, with or without wrapper prefixes, as ours."""
    key = clean_key(key)
    match = _ORIGINAL_MLP.match(key)
    return f"{match.group(1)}{MLP_NAMES[match.group(2)]}.weight" if match else key


def is_original_state(model_keys: Iterable[str]) -> bool:
    """True when the model's parameter names are those of the original trainer (its MLP naming)."""
    return any(_ORIGINAL_MLP.match(clean_key(k)) for k in model_keys)


def is_original_checkpoint(path: Path) -> bool:
    """True for a checkpoint file of the original trainer; False for ours, sharded directories and unreadable files."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        state = _load(path)
    except CheckpointError:  # the caller's own loader reports it
        return False
    return isinstance(state, dict) and isinstance(state.get("model"), dict) and is_original_state(state["model"])


def load_original_checkpoint(path: Path, with_optimizer: bool = True) -> OriginalCheckpoint:
    """An original checkpoint with our parameter names: the model (memory-mapped tensors), the optimizer state by
    parameter name (`with_optimizer`; None when it never stepped), the counters and hparams. Raises CheckpointError
    naming the file and the field for anything missing or malformed."""
    path = Path(path)
    state = _load(path)
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict) or not is_original_state(state["model"]):
        raise CheckpointError(f"{path}: not a checkpoint of the original TinyLlama/LLäMmlein trainer (no 'model' with "
                              "mlp.w1/w2/w3 or mlp.swiglu.w1/w2/w3 weights)")
    model = convert_model(state["model"], path)
    step_count, iter_num, hparams = read_counters(state, path)
    optimizer = None
    if with_optimizer:
        if "optimizer" not in state:
            raise CheckpointError(f"{path}: no 'optimizer' entry (weights only: start from it with --init_from)")
        optimizer = convert_optimizer(state["optimizer"], list(state["model"]), model, path)
    return OriginalCheckpoint(model, optimizer, step_count, iter_num, hparams)


def as_our_checkpoint(state: dict, path: Path) -> dict:
    """A loaded checkpoint dict (with a "model" dict) as ours when the original trainer wrote it, else `state` itself:
    our parameter names, `config` from `hparams["model_name"]` when that model is known here, counters checked, no
    optimizer."""
    if not is_original_state(state["model"]):
        return state
    if set(state) == {"model"}:  # bare weights with the original names
        return {"model": convert_model(state["model"], path)}
    step_count, iter_num, hparams = read_counters(state, path)
    name = hparams.get("model_name")
    config = Config.from_name(name).to_dict() if isinstance(name, str) and name in name_to_config else None
    return {"model": convert_model(state["model"], path), "config": config, "step_count": step_count,
            "iter_num": iter_num, "hparams": hparams}


# ------------------------------------------------------------------ conversion and checks
def _load(path: Path) -> Any:
    """The file's contents, memory-mapped: nothing is read until used."""
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # torch raises many types for a file that is not a checkpoint
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})") from None


def convert_model(model: dict, path: Path) -> dict[str, torch.Tensor]:
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in model.items():
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{path}: model entry {key!r} is a {type(tensor).__name__}, not a tensor")
        if ".swiglu.w12." in key:
            raise CheckpointError(f"{path}: model entry {key!r}: packed SwiGLU weights (w12) are not supported")
        name = our_key(key)
        if name in converted:
            raise CheckpointError(f"{path}: model entries {key!r} and another both map to {name!r}")
        converted[name] = tensor
    return converted


def read_counters(state: dict, path: Path) -> tuple[int, int, dict]:
    """(step_count, iter_num, hparams), each present and of the right type."""
    values = {}
    for field in ("step_count", "iter_num"):
        value = state.get(field)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            problem = "missing" if field not in state else f"{value!r} is not a count"
            raise CheckpointError(f"{path}: field '{field}' {problem}")
        values[field] = value
    if values["step_count"] > values["iter_num"]:
        raise CheckpointError(f"{path}: step_count {values['step_count']} exceeds iter_num {values['iter_num']} "
                              "(optimizer steps cannot outnumber micro-batches)")
    hparams = state.get("hparams")
    if not isinstance(hparams, dict):
        raise CheckpointError(f"{path}: field 'hparams' {'missing' if hparams is None else 'is not a dict'}")
    return values["step_count"], values["iter_num"], hparams


def convert_optimizer(optim: Any, stored_keys: list[str], model: dict[str, torch.Tensor], path: Path) -> dict | None:
    """The original optimizer state keyed by our parameter names; None for an optimizer that never stepped.

    `stored_keys` are the model's keys in stored order: a one-device state is keyed by position in that order."""
    if not (isinstance(optim, dict) and isinstance(optim.get("state"), dict)
            and isinstance(optim.get("param_groups"), list)):
        raise CheckpointError(f"{path}: field 'optimizer' is not an optimizer state dict ('state', 'param_groups')")
    groups = optim["param_groups"]
    if not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups):
        raise CheckpointError(f"{path}: optimizer.param_groups: every group needs a 'params' list")
    ids = [p for g in groups for p in g["params"]]
    if all(isinstance(p, str) for p in ids):  # FSDP.optim_state_dict: parameter names
        name_of = {p: our_key(p) for p in ids}
    elif all(isinstance(p, int) for p in ids):  # optimizer.state_dict(): positions in model.parameters()
        if len(ids) != len(stored_keys):
            raise CheckpointError(f"{path}: optimizer.param_groups hold {len(ids)} parameters, the model "
                                  f"{len(stored_keys)}")
        name_of = {p: our_key(key) for p, key in zip(ids, stored_keys)}
    else:
        raise CheckpointError(f"{path}: optimizer.param_groups: 'params' mixes names and indices")
    names = list(name_of.values())
    unknown = sorted(set(names) - set(model))
    if unknown or len(set(names)) != len(names) or len(names) != len(model):
        detail = f"names {unknown[:3]} not in the model" if unknown else "not one entry per model parameter"
        raise CheckpointError(f"{path}: optimizer.param_groups: {detail}")

    state: dict[str, dict] = {}
    for key, entry in optim["state"].items():
        if key not in name_of:
            raise CheckpointError(f"{path}: optimizer.state[{key!r}] belongs to no param group")
        name = name_of[key]
        where = f"{path}: optimizer.state[{key!r}] ({name})"
        if not isinstance(entry, dict):
            raise CheckpointError(f"{where}: not a dict")
        for moment in ADAM_MOMENTS:
            value = entry.get(moment)
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(f"{where}: '{moment}' {'missing' if value is None else 'is not a tensor'} "
                                      "(an AdamW state is expected)")
            if value.shape != model[name].shape:
                raise CheckpointError(f"{where}: '{moment}' has shape {list(value.shape)}, the parameter "
                                      f"{list(model[name].shape)}")
        step = entry.get("step")
        if not (isinstance(step, (int, float)) or isinstance(step, torch.Tensor) and step.numel() == 1):
            raise CheckpointError(f"{where}: 'step' {'missing' if step is None else 'is not a number'}")
        state[name] = entry
    if not state:
        return None
    missing = [n for n in names if n not in state]
    if missing:
        raise CheckpointError(f"{path}: optimizer.state has no entry for {missing[:3]}")
    return {"state": state, "param_groups": [{**{k: v for k, v in g.items() if k != "params"},
                                              "params": [name_of[p] for p in g["params"]]} for g in groups]}


# ------------------------------------------------------------------ into a training run
def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, optimizer_state: dict) -> None:
    """Give each parameter of `optimizer` its converted AdamW state (moments and step), whatever its param groups
    (ours: decay / no-decay by name); the groups' hyperparameters stay the optimizer's own.

    Goes through torch's strategy-agnostic state-dict API, so it serves one device, DDP, FSDP and FSDP2 alike
    (collective: every rank calls it with the full state). `model`/`optimizer` may be Fabric-wrapped."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    module = getattr(model, "_forward_module", model)
    optimizer = getattr(optimizer, "optimizer", optimizer)
    groups = get_optimizer_state_dict(module, optimizer)["param_groups"]  # our names, in our group structure
    names = [n for g in groups for n in g["params"]]
    missing = sorted(set(names) - set(optimizer_state["state"]))
    extra = sorted(set(optimizer_state["state"]) - set(names))
    if missing or extra:
        raise ValueError(f"the optimizer state does not fit this model: missing {missing[:3]}, unexpected {extra[:3]}")
    # Copies: the optimizer updates its state in place, and FSDP's saved state shares one "step" tensor among the
    # parameters of each wrapped unit (counted up once per parameter, it would skew the bias correction).
    state = {n: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in optimizer_state["state"][n].items()}
             for n in names}
    full = {"state": state, "param_groups": groups}
    set_optimizer_state_dict(module, optimizer, full, options=StateDictOptions(full_state_dict=True))
