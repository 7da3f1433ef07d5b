"""Pretrain a Llama-style model with Lightning Fabric (FSDP, FSDP2, DDP or one device; CUDA or CPU).

    srun apptainer exec llammlein.sif python pretrain/tinyllama_fabric.py [--name value ...] [--config run.yaml]
    python pretrain/tinyllama_fabric.py --resume out/NAME/iter-00100000-ckpt.pth     # or --resume auto

Every hyperparameter below can be overridden as `--name value` or from a YAML file (`--config`); any field of
`lit_gpt.Config` overrides the named model (`--n_layer 2 --n_embd 64`). `--help` lists them all.
Checkpoints are named after the optimizer step: iter-{step:08d}-ckpt.pth.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any, Iterator, Optional

# Run from anywhere without installing: the repo root holds `lit_gpt`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
import yaml
from lightning.fabric import Fabric
from lightning.fabric.loggers import TensorBoardLogger
from lightning.fabric.plugins.environments import SLURMEnvironment
from torch.distributed.checkpoint import CheckpointException

from lit_gpt.checkpoints import (SaveError, checkpoint_path, checkpoint_step, latest_checkpoint, list_checkpoints,
                                  load_checkpoint, save_checkpoint, verify_checkpoint)
from lit_gpt.config import Config
from lit_gpt.datapoints import DatapointLogger
from lit_gpt.distributed import SHARDING_STRATEGIES, STRATEGIES, make_strategy
from lit_gpt.model import GPT, num_parameters
from lit_gpt.packed_dataset import PackedDataset, StepLoader
from lit_gpt.speed_monitor import SpeedMonitor, device_peak_flops, flops_per_token
from lit_gpt.tokenizer import Tokenizer

# ---------------------------------------------------------------------------------------------------------------
# Hyperparameters (LLäMmlein 1B defaults). Edit here, or override: --name value / --config run.yaml
model_name = "LLaMmlein_1B"
out_dir = ""  # empty: out/{model_name}
train_data_dir = "data/train"  # comma-separated for several sources
train_data_weights = ""  # comma-separated mixing weights, one per source; empty: proportional to size
val_data_dir = "data/val"  # empty: no validation
tokenizer_path = "tokenizer"  # a dir with tokenizer.model / tokenizer.json; empty: skip the vocab check
init_from = ""  # a converted checkpoint (.pth with "model") to start from: weights only, fresh optimizer
resume = ""  # a checkpoint path, "auto" (newest complete one in out_dir, if any) or empty
# Batch and schedule
global_batch_size = 512  # samples per optimizer step, over all ranks
micro_batch_size = 8  # samples per forward pass on one rank
max_steps = 100_000
max_tokens = 0  # >0: overrides max_steps with ceil(max_tokens / (global_batch_size * block_size))
stop_at_step = 0  # >0: checkpoint and exit after this step (split one run into several jobs)
learning_rate = 4e-4
min_lr = 4e-5
warmup_steps = 2000
lr_schedule = "cosine"  # "cosine" or "wsd" (warmup-stable-decay)
decay_fraction = 0.2  # wsd: share of max_steps spent in the final linear decay
weight_decay = 0.1
decay_embeddings = False  # norms and biases are never decayed; embeddings only if True
beta1 = 0.9
beta2 = 0.95
adam_eps = 1e-8
grad_clip = 1.0  # 0: no clipping (the norm is still logged)
z_loss = 0.0  # weight of the softmax normaliser penalty (PaLM z-loss); 0 disables it
max_nonfinite_steps = 5  # stop after this many consecutive steps with a non-finite loss or gradient
document_masking = False  # attend only within each packed document; RoPE positions restart per document
# Logging, evaluation, checkpoints
log_interval = 10
eval_interval = 1000  # 0: only at the end
eval_iters = 25  # validation batches of global_batch_size samples
save_interval = 5000
keep_last_checkpoints = 3  # 0 keeps all
# Parallelism and performance
accelerator = "auto"  # auto, cuda, cpu
devices = "auto"  # per node; taken from Slurm when launched with srun
num_nodes = 1
strategy = "fsdp"  # fsdp, fsdp2, ddp, auto (single device)
sharding_strategy = "SHARD_GRAD_OP"  # FSDP: FULL_SHARD, SHARD_GRAD_OP, HYBRID_SHARD, NO_SHARD
state_dict_type = "full"  # "full" (one .pth file) or "sharded" (a torch distributed checkpoint directory)
precision = "bf16-mixed"  # bf16-mixed, bf16-true, 32-true
activation_checkpointing = False
attn_impl = "auto"  # auto, fa3, fa2, sdpa, eager
compile = False  # torch.compile each Block
meta_init = "auto"  # build the model on the meta device and initialise it sharded; auto: FSDP and > 2B params
num_workers = 2  # data loader processes per rank
cache_dir = ""  # node-local cache for chunks (e.g. /dev/shm/llammlein); empty: read in place
cache_max_gb = 0.0
verify_data = False  # hash every chunk against its manifest's sha256 before training (ranks share the work)
seed = 42
# ---------------------------------------------------------------------------------------------------------------
HPARAMS = {k: v for k, v in dict(globals()).items() if not k.startswith("_") and isinstance(v, (bool, int, float, str))}
# No "16-mixed": its gradient scaler refuses clipping with the fused AdamW on CUDA, and a skipped non-finite step
# (no optimizer.step, so no scaler.update) would never lower the loss scale. On CPU Fabric silently ran it as bf16.
PRECISIONS = ("bf16-mixed", "bf16-true", "32-true")


class InputError(Exception):
    """A bad flag, file or directory, reported before any training starts."""


# ------------------------------------------------- command line ------------------------------------------------
def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _typed(default: Any):
    return _parse_bool if isinstance(default, bool) else type(default)


def parse_hparams(argv: Optional[list[str]] = None) -> tuple[dict, dict]:
    """Resolve hyperparameters: file defaults < YAML file < command line. Returns (hparams, model overrides)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file of hyperparameters (and model config fields)")
    kinds = {key: _typed(default) for key, default in HPARAMS.items()}
    for key, default in HPARAMS.items():
        parser.add_argument(f"--{key}", type=kinds[key], default=argparse.SUPPRESS, help=f"default: {default!r}")
    config_fields = [f for f in fields(Config) if f.name not in ("name", "attn_impl")]
    group = parser.add_argument_group("model config overrides (lit_gpt.Config fields)")
    for f in config_fields:
        kinds[f.name] = {"int": int, "float": float, "Optional[int]": int}.get(str(f.type), int)
        group.add_argument(f"--{f.name}", type=kinds[f.name], default=argparse.SUPPRESS)
    model_fields = {f.name for f in config_fields}
    given = vars(parser.parse_args(argv))

    hparams, overrides = dict(HPARAMS), {}
    if config_file := given.pop("config", None):
        try:
            from_file = yaml.safe_load(Path(config_file).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise InputError(f"--config {config_file}: cannot read YAML ({e})") from e
        if not isinstance(from_file, dict):
            raise InputError(f"--config {config_file}: expected a mapping of names to values")
        unknown = set(from_file) - set(kinds)
        if unknown:
            raise InputError(f"--config {config_file}: unknown keys {sorted(unknown)}")
        # The same conversions as on the command line (YAML reads 1e-3 as a string, for one).
        for key, value in from_file.items():
            try:
                from_file[key] = kinds[key](str(value))
            except (ValueError, argparse.ArgumentTypeError):
                expected = "true/false" if kinds[key] is _parse_bool else kinds[key].__name__
                raise InputError(f"--config {config_file}: {key}: expected {expected}, got {value!r}") from None
        given = {**from_file, **given}
    for key, value in given.items():
        (overrides if key in model_fields else hparams)[key] = value
    if not hparams["out_dir"]:
        hparams["out_dir"] = f"out/{hparams['model_name']}"
    return hparams, overrides


# ------------------------------------------------- validation --------------------------------------------------
def resolve_world(hp: dict) -> tuple[str, int, int, str]:
    """(accelerator, devices per node, nodes, launcher): from Slurm's environment when srun started us."""
    accel = hp["accelerator"]
    if accel == "auto":
        accel = "cuda" if torch.cuda.is_available() else "cpu"
    if SLURMEnvironment.detect() and "SLURM_NTASKS_PER_NODE" in os.environ:
        # Fabric takes ranks from Slurm; devices and nodes must agree with the allocation.
        per_node = int(os.environ["SLURM_NTASKS_PER_NODE"].split("(")[0])
        return accel, per_node, int(os.environ["SLURM_NNODES"]), "slurm"
    devices = hp["devices"]
    if devices == "auto":
        devices = torch.cuda.device_count() if accel == "cuda" else 1
    try:
        devices = int(devices)
    except ValueError:
        raise InputError(f"--devices must be an integer or 'auto', got {devices!r}") from None
    return accel, devices, int(hp["num_nodes"]), "local"


def _check_data_dir(flag: str, path: str) -> None:
    p = Path(path)
    if not p.is_dir():
        raise InputError(f"--{flag} {path}: directory does not exist")
    if not any(p.glob("*.bin")):
        raise InputError(f"--{flag} {path}: contains no .bin chunk files (run scripts/prepare_data.py first)")


def check_inputs(hp: dict, overrides: dict, world_size: int) -> Config:
    """Fail fast, with one message naming the flag, on every input error we can detect before training."""
    try:
        config = Config.from_name(hp["model_name"], attn_impl=hp["attn_impl"], **overrides)
    except ValueError as e:
        raise InputError(f"--model_name: {e}") from None
    for flag, allowed in (("strategy", STRATEGIES), ("sharding_strategy", SHARDING_STRATEGIES),
                          ("state_dict_type", ("full", "sharded")), ("precision", PRECISIONS),
                          ("lr_schedule", ("cosine", "wsd"))):
        if hp[flag] not in allowed:
            raise InputError(f"--{flag} must be one of {allowed}, got {hp[flag]!r}")
    G, b = hp["global_batch_size"], hp["micro_batch_size"]
    if G <= 0 or b <= 0 or G % world_size:
        raise InputError(f"--global_batch_size {G} must be a positive multiple of the number of devices ({world_size})")
    if (G // world_size) % b:
        raise InputError(
            f"--micro_batch_size {b} does not divide the per-device batch "
            f"(--global_batch_size {G} / {world_size} devices = {G // world_size})"
        )
    # Values that would otherwise crash mid-run (`step % 0`) or train silently wrong (eval_iters 0 logs a val loss
    # of 0, min_lr > learning_rate makes the "decay" rise, max_nonfinite_steps 0 stops after the first step).
    for flag, low in (("max_steps", 0 if hp["max_tokens"] else 1), ("max_tokens", 0), ("stop_at_step", 0),
                      ("warmup_steps", 0), ("log_interval", 1), ("eval_interval", 0), ("eval_iters", 1),
                      ("save_interval", 1), ("keep_last_checkpoints", 0), ("max_nonfinite_steps", 1),
                      ("num_workers", 0), ("grad_clip", 0), ("z_loss", 0), ("weight_decay", 0), ("min_lr", 0),
                      ("cache_max_gb", 0)):
        if not hp[flag] >= low:
            raise InputError(f"--{flag} must be >= {low}, got {hp[flag]}")
    if not 0 < hp["learning_rate"] or hp["min_lr"] > hp["learning_rate"]:
        raise InputError(f"--learning_rate {hp['learning_rate']} must be positive and >= --min_lr {hp['min_lr']}")
    if hp["lr_schedule"] == "wsd" and not 0 < hp["decay_fraction"] <= 1:
        raise InputError(f"--decay_fraction must lie in (0, 1] for --lr_schedule wsd, got {hp['decay_fraction']}")
    for flag in ("beta1", "beta2"):
        if not 0 <= hp[flag] < 1:
            raise InputError(f"--{flag} must lie in [0, 1), got {hp[flag]}")
    if not hp["adam_eps"] > 0:
        raise InputError(f"--adam_eps must be positive, got {hp['adam_eps']}")
    sources = hp["train_data_dir"].split(",")
    for source in sources:
        _check_data_dir("train_data_dir", source)
    if hp["train_data_weights"]:
        try:
            weights = [float(w) for w in hp["train_data_weights"].split(",")]
        except ValueError:
            weights = []
        if len(weights) != len(sources) or not all(math.isfinite(w) and w > 0 for w in weights):
            raise InputError(f"--train_data_weights {hp['train_data_weights']!r}: expected {len(sources)} positive "
                             f"comma-separated numbers, one per --train_data_dir source")
    if hp["val_data_dir"]:
        _check_data_dir("val_data_dir", hp["val_data_dir"])
    if hp["tokenizer_path"]:
        try:
            vocab = Tokenizer(hp["tokenizer_path"]).vocab_size
        except Exception as e:
            raise InputError(f"--tokenizer_path {hp['tokenizer_path']}: cannot load tokenizer ({e})") from None
        if vocab > config.vocab_size:
            raise InputError(
                f"--tokenizer_path {hp['tokenizer_path']}: tokenizer has {vocab} tokens, more than the model's "
                f"vocab_size {config.vocab_size} ({hp['model_name']}); pick a larger model or --vocab_size"
            )
    out = Path(hp["out_dir"])
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise InputError(f"--out_dir {out}: not writable ({e.strerror or e})") from None
    if hp["resume"] and hp["resume"] != "auto" and not Path(hp["resume"]).exists():
        raise InputError(f"--resume {hp['resume']}: no such checkpoint")
    if not hp["resume"] and (newest := latest_checkpoint(out, verify=False)) is not None:
        # A fresh run here would mix its checkpoints with the old run's, and rotation would delete the new ones.
        raise InputError(f"--out_dir {out}: holds checkpoints of an earlier run (newest: {newest.name}); pass "
                         f"--resume auto to continue it, or choose another --out_dir")
    if hp["init_from"] and not Path(hp["init_from"]).is_file():
        raise InputError(f"--init_from {hp['init_from']}: no such checkpoint file")
    return config


@contextmanager
def blamed_on(flag: str) -> Iterator[None]:
    """A ValueError raised inside (e.g. by the dataset) becomes an InputError naming the flag whose value caused it."""
    try:
        yield
    except ValueError as e:
        raise InputError(f"--{flag}: {e}") from None


def resume_checkpoint(hp: dict, verify: bool = True) -> Optional[Path]:
    """The checkpoint this run resumes from, if any. `verify` (collective): `auto` takes the newest that verifies, a
    named one must verify."""
    if hp["resume"] == "auto":
        return latest_checkpoint(Path(hp["out_dir"]), verify=verify)
    path = Path(hp["resume"]) if hp["resume"] else None
    if path is not None and verify:
        with blamed_on("resume"):
            verify_checkpoint(path)
    return path


def set_aside_checkpoints_after(out_dir: Path, step: int, log) -> None:
    """Rename the checkpoints later than the resumed `step` to `*.abandoned` (kept, never deleted).

    They belong to the continuation this run replaces (its metrics and datapoint logs are dropped too); left in
    place, the next `--resume auto` (e.g. after a pre-emption) would pick the newest of them over this run's own."""
    for later in list_checkpoints(out_dir):
        if checkpoint_step(later) > step:
            aside = later.with_name(later.name + ".abandoned")
            if aside.is_dir():  # set aside by an earlier resume
                shutil.rmtree(aside)
            aside.unlink(missing_ok=True)
            later.rename(aside)
            log(f"Set aside {later.name} (after the resumed step {step}) as {aside.name}")


# ------------------------------------------------- schedule & optimizer ----------------------------------------
def get_lr(step: int, hp: dict) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine or warmup-stable-decay."""
    lr, min_lr, warmup, total = hp["learning_rate"], hp["min_lr"], hp["warmup_steps"], hp["max_steps"]
    if step < warmup:
        return lr * (step + 1) / warmup
    if hp["lr_schedule"] == "wsd":
        decay_steps = max(1, int(hp["decay_fraction"] * total))
        decay_start = total - decay_steps
        if step < decay_start:
            return lr
        return lr + (min_lr - lr) * min(1.0, (step - decay_start + 1) / decay_steps)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def make_optimizer(model: torch.nn.Module, hp: dict, device: torch.device) -> torch.optim.Optimizer:
    # Decided by name, not shape: FSDP1 flattens parameters, so ndim says nothing there.
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        is_norm = "norm" in name or "ln_f" in name or name.endswith(".bias")
        is_embedding = "wte" in name and not hp["decay_embeddings"]
        (no_decay if is_norm or is_embedding else decay).append(param)
    groups = [{"params": decay, "weight_decay": hp["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel exists for CUDA and CPU (on CPU 3.5x faster than the default per-tensor loop).
    return torch.optim.AdamW(groups, lr=hp["learning_rate"], betas=(hp["beta1"], hp["beta2"]), eps=hp["adam_eps"],
                             fused=device.type in ("cuda", "cpu"))


def token_losses(logits: torch.Tensor, labels: torch.Tensor, z_loss: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of cross-entropy over real tokens, sum of the objective incl. z-loss); labels -100 carry no loss."""
    logits = logits.reshape(-1, logits.size(-1)).float()
    labels = labels.reshape(-1)
    ce = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
    if not z_loss:
        return ce, ce
    lse = torch.logsumexp(logits[labels != -100], dim=-1)
    return ce, ce + z_loss * lse.pow(2).sum()


# ------------------------------------------------- run state ---------------------------------------------------
class Preemption:
    """Slurm warns with SIGUSR1 (sbatch --signal=USR1@T) and stops with SIGTERM: finish the step, save, requeue."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def agreed(self, fabric: Fabric) -> bool:
        """True on every rank once any rank got the signal (so all ranks stop at the same step)."""
        flag = torch.tensor(float(self.requested), device=fabric.device)
        return bool(fabric.all_reduce(flag, reduce_op="sum").item() > 0)


class MetricsLog:
    """metrics.jsonl and metrics.csv in out_dir (rank 0). A resumed run keeps the records up to its checkpoint's step
    (those after it are replaced by the steps it trains again); a fresh run starts them anew."""

    COLUMNS = ("iter", "step", "loss", "val_loss", "lr", "grad_norm", "tokens", "tokens_per_sec", "mfu",
               "skipped_steps", "memory_gb", "time")

    def __init__(self, out_dir: Path, resume_step: Optional[int], enabled: bool) -> None:
        self.jsonl, self.csv = out_dir / "metrics.jsonl", out_dir / "metrics.csv"
        self.enabled = enabled
        if not enabled:
            return
        kept = []
        if self.jsonl.exists() and resume_step is not None:
            kept = [r for r in map(json.loads, self.jsonl.read_text().splitlines()) if r["step"] <= resume_step]
        self.jsonl.write_text("".join(json.dumps(r) + "\n" for r in kept))
        with open(self.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, self.COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(kept)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(record) + "\n")
        with open(self.csv, "a", newline="") as f:
            csv.DictWriter(f, self.COLUMNS, extrasaction="ignore").writerow(record)


def capture_rng() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def write_run_files(out_dir: Path, hp: dict, config: Config, extra: dict) -> None:
    """Beside the checkpoints: resolved hyperparameters, model config and the tokenizer (what an export needs)."""
    (out_dir / "hparams.json").write_text(json.dumps({**hp, **extra}, indent=2))
    (out_dir / "model_config.json").write_text(json.dumps(config.to_dict(), indent=2))
    src = Path(hp["tokenizer_path"]) if hp["tokenizer_path"] else None
    if src is not None and src.exists():
        dst = out_dir / "tokenizer"
        dst.mkdir(exist_ok=True)
        files = [src] if src.is_file() else [p for p in src.iterdir() if p.is_file()]
        for f in files:
            shutil.copy2(f, dst / ("tokenizer.model" if src.is_file() else f.name))


# ------------------------------------------------- evaluation --------------------------------------------------
@torch.no_grad()
def validate(fabric: Fabric, model, val_data: PackedDataset, hp: dict) -> float:
    """Token-weighted mean validation loss over all ranks, on the first eval_iters batches of global_batch_size
    samples of the validation order: the same samples whatever the world size (fewer when the split is smaller)."""
    model.eval()
    W, G = fabric.world_size, hp["global_batch_size"]
    iters = min(hp["eval_iters"], max(1, val_data.samples_per_epoch // G))
    loader = StepLoader(val_data, global_batch_size=G, micro_batch_size=hp["micro_batch_size"],
                        rank=fabric.global_rank, world_size=W, start_step=0, num_workers=0)
    totals = torch.zeros(2, device=fabric.device, dtype=torch.float64)
    for (_, micro_batches), _ in zip(loader, range(iters)):
        for mb in micro_batches:
            logits = model(mb["input_ids"].to(fabric.device), doc_ids=_doc_ids(mb, hp, fabric))
            labels = mb["labels"].to(fabric.device)
            totals[0] += token_losses(logits, labels, 0.0)[0].double()
            totals[1] += (labels != -100).sum()
    totals = fabric.all_reduce(totals, reduce_op="sum")
    model.train()
    return (totals[0] / totals[1].clamp(min=1)).item()


def _doc_ids(mb: dict, hp: dict, fabric: Fabric) -> Optional[torch.Tensor]:
    return mb["doc_ids"].to(fabric.device) if hp["document_masking"] else None


# ------------------------------------------------- training ----------------------------------------------------
def train(fabric: Fabric, hp: dict, config: Config, launcher: str) -> int:
    out_dir = Path(hp["out_dir"])
    rank, W = fabric.global_rank, fabric.world_size
    G, b = hp["global_batch_size"], hp["micro_batch_size"]
    fabric.seed_everything(hp["seed"])  # identical initial weights on every rank
    # Installed before the (possibly long) setup: a signal's default action would kill the job without a save.
    preemption = Preemption()

    sources = hp["train_data_dir"].split(",")
    weights = [float(w) for w in hp["train_data_weights"].split(",")] if hp["train_data_weights"] else None
    cache = dict(cache_dir=hp["cache_dir"] or None, cache_max_bytes=int(hp["cache_max_gb"] * 2**30) or None)
    with blamed_on("train_data_dir"):  # e.g. a source too small for one sample, or no document index for masking
        train_data = PackedDataset(sources, weights, block_size=config.block_size, seed=hp["seed"],
                                   with_doc_ids=hp["document_masking"], vocab_size=config.vocab_size, **cache)
        if hp["verify_data"]:
            fabric.print(f"Verified the checksums of {train_data.verify_checksums()} training chunks")
    with blamed_on("val_data_dir"):
        val_data = (PackedDataset([hp["val_data_dir"]], None, block_size=config.block_size, seed=hp["seed"],
                                  with_doc_ids=hp["document_masking"], vocab_size=config.vocab_size)
                    if hp["val_data_dir"] else None)
        if val_data is not None and hp["verify_data"]:
            fabric.print(f"Verified the checksums of {val_data.verify_checksums()} validation chunks")
    if hp["max_tokens"]:
        hp["max_steps"] = math.ceil(hp["max_tokens"] / (G * config.block_size))

    with torch.device("meta"):
        n_params = num_parameters(GPT(config))
    meta = hp["meta_init"] == "true" or (hp["meta_init"] == "auto" and hp["strategy"] in ("fsdp", "fsdp2")
                                          and n_params > 2e9 and not hp["init_from"])
    with fabric.init_module(empty_init=meta):
        model = GPT(config)
    if hp["init_from"]:
        try:
            state = torch.load(hp["init_from"], map_location="cpu", mmap=True, weights_only=True)
            model.load_state_dict(state.get("model", state))
        except Exception as e:  # not a torch checkpoint, or another architecture: the same on every rank
            raise InputError(f"--init_from {hp['init_from']}: cannot be loaded into {hp['model_name']} "
                             f"({type(e).__name__}: {str(e).strip()[:500]})") from None
    model.activation_checkpointing = hp["activation_checkpointing"]
    if hp["compile"]:
        for block in model.transformer.h:
            block.compile()
    # Module first, optimizer second: FSDP2 would otherwise leave the optimizer holding unsharded parameters.
    model = fabric.setup_module(model)
    optimizer = fabric.setup_optimizers(make_optimizer(model, hp, fabric.device))

    step, iter_num, tokens_seen, skipped = 0, 0, 0, 0
    resume_path = resume_checkpoint(hp)
    if resume_path is not None:
        try:
            ckpt = load_checkpoint(resume_path, model, optimizer)
        except (Exception, CheckpointException) as e:  # the same on every rank: all of them stop with this message
            raise InputError(f"--resume {resume_path}: cannot be loaded into {hp['model_name']} with this optimizer "
                             f"({type(e).__name__}: {str(e).strip()[:500]}); a converted model without optimizer "
                             f"state starts with --init_from") from None
        if ckpt["data"]["global_batch_size"] != G:
            raise InputError(f"--global_batch_size {G} differs from the checkpoint's "
                             f"{ckpt['data']['global_batch_size']}: the sample position would not map to a step")
        step, iter_num, tokens_seen = ckpt["step_count"], ckpt["iter_num"], ckpt["tokens_seen"]
        if 0 < hp["stop_at_step"] <= step < hp["max_steps"]:
            # `step == stop_at_step` would never hold again: the run would silently train on to max_steps.
            raise InputError(f"--stop_at_step {hp['stop_at_step']}: the checkpoint is already at step {step}; "
                             f"pass a later --stop_at_step, or 0 to train to the end")
        skipped = ckpt.get("skipped_steps", 0)
        if ckpt["world_size"] == W:
            restore_rng(ckpt["rng"][rank])
        else:  # elastic resume: per-rank streams cannot carry over; derive fresh ones deterministically
            torch.manual_seed(hp["seed"] + 1000003 * step + rank)
        fabric.print(f"Resumed from {resume_path} at step {step} (written by {ckpt['world_size']} ranks, now {W})")

    if rank == 0:
        write_run_files(out_dir, hp, config, {"world_size": W, "launched_by": launcher, "num_parameters": n_params})
        if resume_path is not None:
            set_aside_checkpoints_after(out_dir, step, fabric.print)
    metrics = MetricsLog(out_dir, resume_step=step if resume_path is not None else None, enabled=rank == 0)
    with blamed_on("train_data_dir"):  # the run was logged with other data
        datapoints = DatapointLogger(out_dir, rank=rank, world_size=W, dataset=train_data, resume_step=step)
    monitor = SpeedMonitor(flops_per_token(config, n_params), W, device_peak_flops(fabric.device))
    fabric.print(f"{hp['model_name']}: {n_params / 1e6:.1f}M parameters | world_size={W} ({launcher}) | "
                 f"{G} samples x {config.block_size} tokens per step | {hp['max_steps']} steps")

    def save(at_step: int) -> Path:
        datapoints.flush(at_step)
        path = checkpoint_path(out_dir, at_step)
        rng = [None] * W
        if W > 1:
            torch.distributed.all_gather_object(rng, capture_rng())
        else:
            rng = [capture_rng()]
        meta = {"step_count": at_step, "iter_num": iter_num, "tokens_seen": tokens_seen, "skipped_steps": skipped,
                "world_size": W, "rng": rng, "hparams": hp, "config": config.to_dict(),
                "data": {"global_batch_size": G, "samples_seen": at_step * G, "manifest": train_data.manifest}}
        save_checkpoint(path, model, optimizer, meta, hp["state_dict_type"], keep_last=hp["keep_last_checkpoints"])
        fabric.print(f"Saved {path}")
        return path

    loader = StepLoader(train_data, global_batch_size=G, micro_batch_size=b, rank=rank, world_size=W,
                        start_step=step, num_workers=hp["num_workers"])
    if val_data is not None and step == 0:
        _log_validation(fabric, model, val_data, hp, metrics, step, iter_num)  # the untrained baseline
    nonfinite_in_a_row = 0
    start_time, start_step = time.perf_counter(), step
    monitor.update(tokens_seen)
    for data_step, micro_batches in loader:
        if step >= hp["max_steps"]:
            break
        assert data_step == step, f"data loader at step {data_step}, trainer at {step}"
        lr = get_lr(step, hp)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # Normalise by the real tokens of the whole global batch: every token weighs the same whatever the split
        # into ranks and micro-batches (and padding).
        real = torch.tensor(float(sum((mb["labels"] != -100).sum() for mb in micro_batches)), device=fabric.device)
        global_real = fabric.all_reduce(real, reduce_op="sum").clamp(min=1)
        loss_sum = torch.zeros((), device=fabric.device)
        for i, mb in enumerate(micro_batches):
            is_accumulating = i < len(micro_batches) - 1
            with fabric.no_backward_sync(model, enabled=is_accumulating):
                logits = model(mb["input_ids"].to(fabric.device), doc_ids=_doc_ids(mb, hp, fabric))
                ce, objective = token_losses(logits, mb["labels"].to(fabric.device), hp["z_loss"])
                fabric.backward(objective * (W / global_real))
            loss_sum += ce.detach()
        grad_norm = fabric.clip_gradients(model, optimizer, max_norm=hp["grad_clip"] or float("inf"),
                                           error_if_nonfinite=False)  # non-finite steps are skipped below
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        loss = (fabric.all_reduce(loss_sum, reduce_op="sum") / global_real).item()
        if math.isfinite(loss) and math.isfinite(float(grad_norm)):
            optimizer.step()
            nonfinite_in_a_row = 0
        else:
            skipped += 1
            nonfinite_in_a_row += 1
            fabric.print(f"step {step}: non-finite loss {loss} / grad norm {float(grad_norm)}, update skipped")
        optimizer.zero_grad(set_to_none=True)
        datapoints.record(step, torch.cat([mb["sample_index"] for mb in micro_batches]))
        step += 1
        iter_num += len(micro_batches)
        tokens_seen += int(global_real.item())
        if step % hp["log_interval"] == 0 or step == hp["max_steps"]:
            monitor.update(tokens_seen)
            elapsed = time.perf_counter() - start_time
            eta = elapsed / (step - start_step) * (hp["max_steps"] - step)
            memory = (torch.cuda.max_memory_allocated() if fabric.device.type == "cuda" else _rss_bytes()) / 2**30
            record = {"iter": iter_num, "step": step, "loss": loss if math.isfinite(loss) else None, "lr": lr, "grad_norm": float(grad_norm) if math.isfinite(float(grad_norm)) else None,
                      "tokens": tokens_seen, "tokens_per_sec": monitor.tokens_per_sec(), "mfu": monitor.mfu(),
                      "skipped_steps": skipped, "memory_gb": memory, "time": elapsed}
            metrics.write(record)
            fabric.log_dict({k: v for k, v in record.items() if v is not None and k not in ("step", "time")}, step=step)
            tps, mfu = record["tokens_per_sec"], record["mfu"]
            fabric.print(f"step {step}/{hp['max_steps']} | loss {loss:.4f} | lr {lr:.2e} | grad {float(grad_norm):.3f}"
                         + (f" | {tps:,.0f} tok/s" if tps else "") + (f" | MFU {mfu:.1%}" if mfu else "")
                         + f" | mem {memory:.1f} GiB | ETA {eta / 60:.1f} min")

        if nonfinite_in_a_row >= hp["max_nonfinite_steps"]:
            fabric.print(f"error: {nonfinite_in_a_row} consecutive non-finite steps; stopping. The last good "
                         f"checkpoint is {latest_checkpoint(out_dir)}", file=sys.stderr)
            return 1

        if val_data is not None and hp["eval_interval"] and step % hp["eval_interval"] == 0 and step < hp["max_steps"]:
            _log_validation(fabric, model, val_data, hp, metrics, step, iter_num)

        stop_now = preemption.agreed(fabric) or step == hp["stop_at_step"]
        periodic = (step % hp["save_interval"] == 0 or step == hp["max_steps"]) and not nonfinite_in_a_row
        if periodic or stop_now:
            save(step)
        if stop_now:
            if preemption.requested and launcher == "slurm" and rank == 0 and "SLURM_JOB_ID" in os.environ:
                fabric.print(f"Pre-empted: requeueing Slurm job {os.environ['SLURM_JOB_ID']}")
                subprocess.run(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]], check=False)
            fabric.print(f"Stopped at step {step}; resume with --resume auto")
            return 0

    if val_data is not None:
        _log_validation(fabric, model, val_data, hp, metrics, step, iter_num)
    return 0


def _log_validation(fabric, model, val_data, hp, metrics: MetricsLog, step: int, iter_num: int) -> None:
    val_loss = validate(fabric, model, val_data, hp)
    metrics.write({"iter": iter_num, "step": step, "val_loss": val_loss})
    fabric.log_dict({"val_loss": val_loss}, step=step)
    fabric.print(f"step {step} | val loss {val_loss:.4f} | val ppl {math.exp(min(val_loss, 50)):.1f}")


def _rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(argv: Optional[list[str]] = None) -> int:
    try:
        hp, overrides = parse_hparams(argv)
        accel, devices, nodes, launcher = resolve_world(hp)
        config = check_inputs(hp, overrides, devices * nodes)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.set_float32_matmul_precision("high")
    # Like metrics.jsonl: TensorBoard hides the events an earlier run logged after the step resumed from (which this
    # run logs again), and all of them on a fresh start; otherwise resumed curves show every such step twice.
    resumed_at = resume_checkpoint(hp, verify=False)  # ranks are not connected yet; train() verifies
    try:
        purge_step = checkpoint_step(resumed_at) + 1 if resumed_at is not None else 0
    except ValueError:  # --resume with a file of another name: its step is known only once loaded
        purge_step = None
    logger = TensorBoardLogger(root_dir=hp["out_dir"], name="tensorboard", version="", purge_step=purge_step)
    fabric = Fabric(accelerator=accel, devices=devices, num_nodes=nodes, precision=hp["precision"],
                    strategy=make_strategy(hp["strategy"], devices * nodes, nodes, hp["sharding_strategy"]),
                    loggers=[logger])
    fabric.launch()
    try:
        return train(fabric, hp, config, launcher)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SaveError as e:  # e.g. a full disk: the earlier checkpoints are kept
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
