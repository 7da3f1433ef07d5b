"""Pretrain a Llama-style model with Lightning Fabric (FSDP, FSDP2, DDP or one device; CUDA or CPU).

    srun apptainer exec llammlein.sif python pretrain/tinyllama_fabric.py [--name value ...] [--config run.yaml]
    python pretrain/tinyllama_fabric.py --resume out/NAME/iter-00100000-ckpt.pth     # or --resume auto

Every hyperparameter below can be overridden as `--name value` or from a YAML file (`--config`); any field of
`lit_gpt.Config` overrides the named model (`--n_layer 2 --n_embd 64`). `--help` lists them all, `--print_config`
prints the resolved values as YAML for `--config`. Checkpoints are named after the optimizer step:
iter-{step:08d}-ckpt.pth.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

# Only pure-Python imports until the flags are checked; torch and Lightning follow below (hence E402 there).
from lit_gpt import hparams as hparams_lib
from lit_gpt.config import Config
from lit_gpt.hparams import InputError
from lit_gpt.profiling import ProfileWindow, parse_window

# ---------------------------------------------------------------------------------------------------------------
# Hyperparameters (LLäMmlein 1B defaults). Edit here, or override: --name value / --config run.yaml. Each comment is
# the flag's --help text; {choices} and [bounds] in it are enforced.
model_name = "LLaMmlein_1B"  # registered model (lit_gpt/config.py), e.g. LLaMmlein_120M, LLaMmlein_7B, micro
out_dir = ""  # checkpoints, logs and run records; empty: out/MODEL_NAME
train_data_dir = "data/train"  # prepared training split(s); comma-separated for several sources
train_data_weights = ""  # mixing weights, one per training source, comma-separated; empty: proportional to size
val_data_dir = "data/val"  # prepared validation split; empty: no validation
tokenizer_path = "tokenizer"  # directory with tokenizer.json / tokenizer.model, copied into out_dir; empty: no check
init_from = ""  # converted checkpoint (.pth with "model") to start from: weights only, fresh optimizer
resume = ""  # checkpoint to continue from, "auto" (newest good one in out_dir, if any) or empty
# Batch and schedule
global_batch_size = 512  # samples per optimizer step, over all ranks [>= 1]
micro_batch_size = 8  # samples per forward pass on one rank [>= 1]
max_steps = 100_000  # optimizer steps of the whole run (sets the LR schedule) [>= 0]
max_tokens = 0  # >0: sets max_steps to ceil(max_tokens / (global_batch_size * block_size)) [>= 0]
stop_at_step = 0  # >0: checkpoint and exit after this step (one run over several jobs) [>= 0]
learning_rate = 4e-4  # peak learning rate, reached after warmup [> 0]
min_lr = 4e-5  # learning rate at the end of the decay [>= 0]
warmup_steps = 2000  # optimizer steps of linear warmup [>= 0]
lr_schedule = "cosine"  # {cosine, wsd}: cosine decay, or warmup-stable-decay
decay_fraction = 0.2  # wsd: share of max_steps spent in the final linear decay (0, 1]
weight_decay = 0.1  # AdamW decoupled weight decay (norms and biases are never decayed) [>= 0]
decay_embeddings = False  # also decay the token embedding
beta1 = 0.9  # AdamW beta1 [0, 1)
beta2 = 0.95  # AdamW beta2 [0, 1)
adam_eps = 1e-8  # AdamW epsilon [> 0]
grad_clip = 1.0  # clip the global gradient norm to this; 0: no clipping (the norm is still logged) [>= 0]
z_loss = 0.0  # weight of the softmax normaliser penalty (PaLM z-loss); 0 disables it [>= 0]
max_nonfinite_steps = 5  # stop after this many consecutive steps with a non-finite loss or gradient [>= 1]
document_masking = False  # attend only within each packed document; RoPE positions restart per document
# Logging, evaluation, checkpoints
log_interval = 10  # optimizer steps between log lines and metrics records [>= 1]
eval_interval = 1000  # optimizer steps between validations; 0: only at the end [>= 0]
eval_iters = 25  # validation batches of global_batch_size samples [>= 1]
save_interval = 5000  # optimizer steps between checkpoints [>= 1]
keep_last_checkpoints = 3  # checkpoints kept in out_dir; 0 keeps all [>= 0]
logger = "tensorboard,csv"  # comma-separated from {tensorboard, wandb, csv} (metrics.jsonl is always written)
wandb_project = "llammlein"  # W&B project
wandb_entity = ""  # W&B team or user; empty: your default entity
wandb_name = ""  # W&B run name; empty: the out_dir's name
wandb_tags = ""  # W&B tags, comma-separated
profile_steps = ""  # START:END records a torch.profiler trace of those steps (+ CUDA memory) in out_dir/profile
dry_run = False  # run the pre-flight checks, print the run's size, memory per GPU and wall time, and exit
gpu_memory_gb = 80.0  # --dry_run: memory of one GPU in GiB, for "fits" and the largest micro batch [> 0]
assumed_mfu = 0.4  # --dry_run: model FLOPs utilisation the wall time is estimated at (0, 1]
# Parallelism and performance
accelerator = "auto"  # {auto, cuda, cpu}
devices = "auto"  # processes (GPUs) per node: {auto} (all GPUs; 1 on CPU) or a count [>= 1]; Slurm's under srun
num_nodes = 1  # nodes; Slurm's under srun [>= 1]
strategy = "fsdp"  # {fsdp, fsdp2, ddp, auto}: auto is a single device
sharding_strategy = "SHARD_GRAD_OP"  # FSDP/FSDP2 sharding: {FULL_SHARD, SHARD_GRAD_OP, HYBRID_SHARD, NO_SHARD}
state_dict_type = "full"  # {full, sharded}: one .pth file, or a torch distributed checkpoint directory
precision = "bf16-mixed"  # {bf16-mixed, bf16-true, 32-true}
activation_checkpointing = False  # recompute each Block's activations in backward (memory for compute)
attn_impl = "auto"  # {auto, fa3, fa4, fa2, flex, sdpa, eager}: attention kernel; auto: the fastest that runs
compile = False  # torch.compile each Block
meta_init = "auto"  # {auto, true, false}: build on the meta device, initialise sharded; auto: FSDP and > 2B params
num_workers = 2  # data loader processes per rank [>= 0]
cache_dir = ""  # node-local cache for chunks (e.g. /dev/shm/llammlein); empty: read in place
cache_max_gb = 0.0  # size limit of the node-local cache in GiB; 0: no limit [>= 0]
verify_data = False  # hash every chunk against its manifest's sha256 before training (ranks share the work)
seed = 42  # seed of the initial weights and the sample order
# ---------------------------------------------------------------------------------------------------------------
HYPERPARAMETERS = hparams_lib.declared(__file__, globals(), "Hyperparameters (", "-----")
HPARAMS = {name: hp.default for name, hp in HYPERPARAMETERS.items()}
# No "16-mixed": its gradient scaler refuses clipping with the fused AdamW on CUDA, and a skipped non-finite step
# (no optimizer.step, so no scaler.update) would never lower the loss scale. On CPU Fabric silently ran it as bf16.


# ------------------------------------------------- command line ------------------------------------------------
MODEL_FIELDS = {f.name: hparams_lib.Hyperparameter.from_comment(f.name, {"float": float}.get(str(f.type), int)(1),
                                                                f.metadata["help"], "default: as --model_name")
                for f in fields(Config) if "help" in f.metadata}


def parse_hparams(argv: list[str] | None = None) -> tuple[dict, dict, bool]:
    """Resolve hyperparameters: file defaults < YAML file < command line. Returns (hparams, model overrides,
    --print_config); every value is typed and checked against its declaration."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     usage="%(prog)s [--config YAML] [--print_config] [--NAME VALUE ...]")
    parser.add_argument("--config", metavar="YAML", help="YAML file of hyperparameters and model config fields; "
                        "the command line wins")
    parser.add_argument("--print_config", action="store_true", help="print the resolved hyperparameters and model "
                        "config as YAML (for --config) and exit")
    hparams_lib.add_arguments(parser, HYPERPARAMETERS)
    hparams_lib.add_arguments(parser, MODEL_FIELDS, "model config overrides (lit_gpt.Config fields)")
    given = vars(parser.parse_args(argv))
    print_config = given.pop("print_config")
    values = hparams_lib.resolve(given, {**HYPERPARAMETERS, **MODEL_FIELDS}, given.pop("config", None))
    hparams = {**HPARAMS, **{k: v for k, v in values.items() if k in HYPERPARAMETERS}}
    if not hparams["out_dir"]:
        hparams["out_dir"] = f"out/{hparams['model_name']}"
    return hparams, {k: v for k, v in values.items() if k in MODEL_FIELDS}, print_config


@contextmanager
def blamed_on(flag: str) -> Iterator[None]:
    """A ValueError raised inside (e.g. by the dataset) becomes an InputError naming the flag whose value caused it."""
    try:
        yield
    except ValueError as e:
        raise InputError(f"--{flag}: {e}") from None


def check_hparams(hp: dict, overrides: dict) -> Config:
    """Checks that need more than one flag (each flag alone was checked when parsed); resolves max_tokens."""
    try:
        config = Config.from_name(hp["model_name"], attn_impl=hp["attn_impl"], **overrides)
    except ValueError as e:
        blamed = " ".join(f"--{k} {v}" for k, v in overrides.items())
        raise InputError(f"model config ({blamed}): {e}" if overrides else f"--model_name: {e}") from None
    if hp["max_tokens"]:
        hp["max_steps"] = math.ceil(hp["max_tokens"] / (hp["global_batch_size"] * config.block_size))
    if hp["max_steps"] < 1:
        raise InputError(f"--max_steps must be >= 1 (or set --max_tokens), got {hp['max_steps']}")
    if hp["min_lr"] > hp["learning_rate"]:  # the "decay" would rise
        raise InputError(f"--min_lr {hp['min_lr']} is above --learning_rate {hp['learning_rate']}")
    with blamed_on("profile_steps"):
        parse_window(hp["profile_steps"])
    sources = hp["train_data_dir"].split(",")
    if hp["train_data_weights"]:
        try:
            weights = [float(w) for w in hp["train_data_weights"].split(",")]
        except ValueError:
            weights = []
        if len(weights) != len(sources) or not all(math.isfinite(w) and w > 0 for w in weights):
            raise InputError(f"--train_data_weights {hp['train_data_weights']!r}: expected {len(sources)} positive "
                             f"comma-separated numbers, one per --train_data_dir source")
    return config


def cli(argv: list[str] | None) -> tuple[dict, Config]:
    """The checked hyperparameters and model config; exits (code 2) on a bad flag, (0) after --print_config."""
    try:
        hp, overrides, print_config = parse_hparams(argv)
        config = check_hparams(hp, overrides)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if print_config:
        model = {k: v for k, v in config.to_dict().items() if k in MODEL_FIELDS}
        print(hparams_lib.to_yaml({**hp, **model}), end="")
        sys.exit(0)
    return hp, config


CLI_ARGS: tuple[dict, Config] | None = None
if __name__ == "__main__":
    # --help, --print_config and flag errors answer before torch and Lightning are imported (5-15 s on a busy node).
    CLI_ARGS = cli(sys.argv[1:])

import torch
from lightning.fabric import Fabric
from lightning.fabric.plugins.environments import SLURMEnvironment
from torch.distributed.checkpoint import CheckpointException

from lit_gpt import preflight
from lit_gpt.attention import DocumentMask, resolve_backend
from lit_gpt.checkpoint.find import latest_checkpoint
from lit_gpt.checkpoint.layout import SaveError
from lit_gpt.checkpoint.load import load_training_state, load_weights
from lit_gpt.checkpoint.publish import write_atomically
from lit_gpt.checkpoint.ranks import gather
from lit_gpt.checkpoint.save import save_checkpoint
from lit_gpt.datapoints import DatapointLogger
from lit_gpt.distributed import make_strategy
from lit_gpt.loggers import RunLoggers
from lit_gpt.loss import token_losses
from lit_gpt.metrics_log import MetricsLog, read_metrics
from lit_gpt.model import GPT, num_parameters
from lit_gpt.packed_dataset import PackedDataset, StepLoader
from lit_gpt.resume import (
    check_original_resumable,
    check_out_dir,
    check_resumable,
    resume_checkpoint,
    set_aside_checkpoints_after,
)
from lit_gpt.rng import RNGState
from lit_gpt.run_dir import RunDir
from lit_gpt.schedule import LRSchedule, parameter_groups
from lit_gpt.speed_monitor import MFU_CONVENTION, SpeedMonitor, device_peak_flops, flops_per_token, matmul_parameters
from lit_gpt.tokenizer import Tokenizer, file_sha256, tokenizer_files


# ------------------------------------------------- validation --------------------------------------------------
def resolve_world(hp: dict) -> tuple[str, int, int, str]:
    """(accelerator, devices per node, nodes, launcher): from Slurm's environment when srun started us."""
    accel = hp["accelerator"]
    if accel == "auto":
        accel = "cuda" if torch.cuda.is_available() else "cpu"
    if accel == "cuda" and not torch.cuda.is_available():
        raise InputError("--accelerator cuda: no CUDA device is visible (torch.cuda.is_available() is False)")
    if SLURMEnvironment.detect() and "SLURM_NTASKS_PER_NODE" in os.environ:
        # Fabric takes ranks from Slurm; devices and nodes must agree with the allocation.
        per_node = int(os.environ["SLURM_NTASKS_PER_NODE"].split("(")[0])
        return accel, per_node, int(os.environ["SLURM_NNODES"]), "slurm"
    if hp["devices"] != "auto":
        devices = int(hp["devices"])  # checked when parsed: "auto" or an integer >= 1
    elif accel == "cuda":
        devices = torch.cuda.device_count()
    else:
        devices = 1
    return accel, devices, hp["num_nodes"], "local"


def _check_data_dir(flag: str, path: str) -> None:
    p = Path(path)
    if not p.is_dir():
        raise InputError(f"--{flag} {path}: directory does not exist")
    if not any(p.glob("*.bin")):
        raise InputError(f"--{flag} {path}: contains no .bin chunk files (run scripts/prepare_data.py first)")


def check_data_tokenizer(hp: dict) -> None:
    """Data prepared with another tokenizer than --tokenizer_path trains on ids that mean other tokens: compare the
    tokenizer files each split's manifest recorded (prepare_data.py) with those of --tokenizer_path."""
    ours = {path.name: file_sha256(path) for path in tokenizer_files(Path(hp["tokenizer_path"]))}
    for flag in ("train_data_dir", "val_data_dir"):
        for directory in filter(None, hp[flag].split(",")):
            manifest = Path(directory) / "manifest.json"
            try:
                recorded = json.loads(manifest.read_text(encoding="utf-8"))["tokenizer"]["files_sha256"]
            except (OSError, ValueError, KeyError, TypeError):
                continue  # no manifest (TinyLlama's folders) or an older one: the token-id check at read time remains
            differing = sorted(name for name in set(recorded) | set(ours) if recorded.get(name) != ours.get(name))
            if differing:
                raise InputError(f"--{flag} {directory}: prepared with another tokenizer than --tokenizer_path "
                                 f"{hp['tokenizer_path']} (they differ in {', '.join(differing)}); prepare the data "
                                 f"with this tokenizer, or pass the one the data was made with")


def check_inputs(hp: dict, config: Config, world_size: int) -> None:
    """Fail fast, with one message naming the flag, on every file or world-size error detectable before training."""
    G, b = hp["global_batch_size"], hp["micro_batch_size"]
    if G % world_size:
        raise InputError(f"--global_batch_size {G} must be a multiple of the number of devices ({world_size})")
    if (G // world_size) % b:
        raise InputError(
            f"--micro_batch_size {b} does not divide the per-device batch "
            f"(--global_batch_size {G} / {world_size} devices = {G // world_size})"
        )
    for source in hp["train_data_dir"].split(","):
        _check_data_dir("train_data_dir", source)
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
        check_data_tokenizer(hp)
    out = Path(hp["out_dir"])
    if out.exists() and not out.is_dir():
        raise InputError(f"--out_dir {out}: exists and is not a directory")
    probe_dir = next(p for p in (out, *out.parents) if p.exists())  # creating out_dir waits for a good start
    if not os.access(probe_dir, os.W_OK | os.X_OK):
        raise InputError(f"--out_dir {out}: not writable ({probe_dir} does not allow it)")
    check_out_dir(out, hp["resume"])
    if hp["init_from"] and not Path(hp["init_from"]).exists():
        raise InputError(f"--init_from {hp['init_from']}: no such checkpoint")


# ------------------------------------------------- optimizer ---------------------------------------------------
def make_optimizer(model: torch.nn.Module, hp: dict) -> torch.optim.Optimizer:
    groups = parameter_groups(model, hp["weight_decay"], hp["decay_embeddings"])
    # Fused (CUDA and CPU; on CPU 3.5x faster than the per-tensor loop): the training loop relies on its `found_inf`
    # input to skip non-finite steps on the device.
    return torch.optim.AdamW(groups, lr=hp["learning_rate"], betas=(hp["beta1"], hp["beta2"]), eps=hp["adam_eps"],
                             fused=True)


# ------------------------------------------------- run state ---------------------------------------------------
class Preemption:
    """Slurm warns with SIGUSR1 (sbatch --signal=USR1@T) and stops with SIGTERM: finish the step, save, requeue."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True


def write_run_files(out_dir: Path, hp: dict, config: Config, extra: dict) -> None:
    """Beside the checkpoints: resolved hyperparameters, model config and the tokenizer (what an export needs)."""
    run = RunDir(out_dir)
    write_atomically(run.hparams, json.dumps({**hp, **extra}, indent=2).encode())
    write_atomically(run.model_config, json.dumps(config.to_dict(), indent=2).encode())
    src = Path(hp["tokenizer_path"]) if hp["tokenizer_path"] else None
    if src is not None and src.exists():
        dst = run.tokenizer
        dst.mkdir(exist_ok=True)
        files = [src] if src.is_file() else [p for p in src.iterdir() if p.is_file()]
        for f in files:
            write_atomically(dst / ("tokenizer.model" if f.suffix == ".model" else f.name), f.read_bytes())


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
            logits = model(_to(mb["input_ids"], fabric), doc_mask=_doc_mask(mb, hp, fabric))
            labels = _to(mb["labels"], fabric)
            totals[0] += token_losses(logits, labels, 0.0)[0].double()
            totals[1] += (labels != -100).sum()
    totals = fabric.all_reduce(totals, reduce_op="sum")
    model.train()
    return (totals[0] / totals[1].clamp(min=1)).item()


def _to(x, fabric: Fabric):
    # The loader pins batches when CUDA is in use: the copy overlaps with compute instead of synchronising.
    return x.to(fabric.device, non_blocking=True)


def _doc_mask(mb: dict, hp: dict, fabric: Fabric) -> DocumentMask | None:
    return _to(mb["doc_mask"], fabric) if hp["document_masking"] else None


# ------------------------------------------------- training ----------------------------------------------------
@dataclass
class Progress:
    """Where the run is: what a checkpoint carries besides model, optimizer and RNG states."""

    step: int = 0  # optimizer steps taken
    iter_num: int = 0  # micro-batches per rank so far
    tokens_seen: int = 0  # real (non-padding) tokens of all ranks
    skipped: int = 0  # steps whose update was skipped (non-finite loss or gradient)


@dataclass
class StepResult:
    loss: float  # mean over the global batch's real tokens
    grad_norm: float  # before clipping
    tokens: int  # real tokens of the global batch
    stop_requested: bool  # any rank got SIGUSR1/SIGTERM

    @property
    def finite(self) -> bool:
        return math.isfinite(self.loss) and math.isfinite(self.grad_norm)


def load_data(fabric: Fabric, hp: dict, config: Config) -> tuple[PackedDataset, PackedDataset | None]:
    sources = hp["train_data_dir"].split(",")
    weights = [float(w) for w in hp["train_data_weights"].split(",")] if hp["train_data_weights"] else None
    cache = dict(cache_dir=hp["cache_dir"] or None, cache_max_bytes=int(hp["cache_max_gb"] * 2**30) or None)
    common = dict(block_size=config.block_size, seed=hp["seed"], with_doc_ids=hp["document_masking"],
                  vocab_size=config.vocab_size)
    with blamed_on("train_data_dir"):  # e.g. a source too small for one sample, or no document index for masking
        train_data = PackedDataset(sources, weights, **common, **cache)
        if hp["verify_data"]:
            fabric.print(f"Verified the checksums of {train_data.verify_checksums()} training chunks")
    val_data = None
    if hp["val_data_dir"]:
        with blamed_on("val_data_dir"):
            val_data = PackedDataset([hp["val_data_dir"]], None, **common)
            if hp["verify_data"]:
                fabric.print(f"Verified the checksums of {val_data.verify_checksums()} validation chunks")
    return train_data, val_data


def build_model(fabric: Fabric, hp: dict, config: Config):
    """(model, optimizer, parameter count), set up for the strategy; weights from --init_from if given."""
    with blamed_on("attn_impl"):  # an explicitly requested backend that cannot run here stops the run before setup
        resolve_backend(config.attn_impl, fabric.device, torch.bfloat16 if "bf16" in hp["precision"] else torch.float32,
                        config.head_size, document_masking=hp["document_masking"], needs_grad=True)
    with torch.device("meta"):
        n_params = num_parameters(GPT(config))
    meta = hp["meta_init"] == "true" or (hp["meta_init"] == "auto" and hp["strategy"] in ("fsdp", "fsdp2")
                                          and n_params > 2e9 and not hp["init_from"])
    with fabric.init_module(empty_init=meta):
        model = GPT(config)
    if hp["init_from"]:  # ours (full or sharded), a converted HF model, or one of the original trainer
        try:
            weights = load_weights(hp["init_from"])["model"]
            model.load_state_dict({key: weights[key] for key in weights})
        except Exception as e:  # not a checkpoint, damaged, or another architecture: the same on every rank
            raise InputError(f"--init_from {hp['init_from']}: cannot be loaded into {hp['model_name']} "
                             f"({type(e).__name__}: {str(e).strip()[:500]})") from None
    model.activation_checkpointing = hp["activation_checkpointing"]
    if hp["compile"]:
        for block in model.transformer.h:
            block.compile()
    # Module first, optimizer second: FSDP2 would otherwise leave the optimizer holding unsharded parameters.
    model = fabric.setup_module(model)
    optimizer = fabric.setup_optimizers(make_optimizer(model, hp))
    return model, optimizer, n_params


def restore(fabric: Fabric, hp: dict, config: Config, model, optimizer,
            train_data: PackedDataset) -> tuple[Path | None, Progress]:
    """Load the checkpoint to resume from (if any) into model and optimizer, check that this run can continue it and
    restore the RNG states. Changes nothing in out_dir."""
    path = resume_checkpoint(hp["resume"], hp["out_dir"])
    if path is None:
        return None, Progress()
    try:
        ckpt = load_training_state(path, model, optimizer)
    except (Exception, CheckpointException) as e:  # the same on every rank: all of them stop with this message
        raise InputError(f"--resume {path}: cannot be loaded into {hp['model_name']} with this optimizer "
                         f"({type(e).__name__}: {str(e).strip()[:500]}); a converted model without optimizer "
                         f"state starts with --init_from") from None
    limits = dict(global_batch_size=hp["global_batch_size"], stop_at_step=hp["stop_at_step"], max_steps=hp["max_steps"])
    if ckpt.get("original"):
        progress = Progress(*check_original_resumable(ckpt, path, block_size=config.block_size, log=fabric.print,
                                                      **limits))
    else:
        progress = Progress(*check_resumable(ckpt, path, data_fingerprint=train_data.manifest["fingerprint"],
                                             train_data_dir=hp["train_data_dir"], **limits))
    # Elastic resume (another world size): per-rank streams cannot carry over; fresh ones are derived deterministically
    saved_rng = ckpt.get("rng") if ckpt.get("world_size") == fabric.world_size else None
    RNGState().resume(saved_rng, fabric.global_rank, fabric.world_size, hp["seed"], progress.step)
    fabric.print(f"Resumed from {path} at step {progress.step} (written by {ckpt.get('world_size', '?')} ranks, "
                 f"now {fabric.world_size})")
    return path, progress


def train_step(fabric: Fabric, model, optimizer, micro_batches: list[dict], data_error: Exception | None,
               hp: dict, stop_signal: bool) -> StepResult:
    """One optimizer step over this rank's micro-batches of the global batch."""
    W = fabric.world_size
    # Normalise by the real tokens of the whole global batch: every token weighs the same whatever the split into
    # ranks and micro-batches (and padding). A rank whose data could not be read says so in the same collective, so
    # that all ranks stop with the error instead of waiting for each other.
    real = float(sum((mb["labels"] != -100).sum() for mb in micro_batches))
    real_and_error = fabric.all_reduce(torch.tensor([real, data_error is not None], dtype=torch.float32)
                                       .to(fabric.device), reduce_op="sum")
    if real_and_error[1].item():  # a sync, but the device is idle here: the last step ended with one
        raise InputError(f"--train_data_dir: {data_error}" if data_error else
                         "--train_data_dir: another rank found unusable training data (its error names the file)")
    global_real = real_and_error[0].clamp(min=1)
    loss_sum = torch.zeros((), device=fabric.device)
    for i, mb in enumerate(micro_batches):
        with fabric.no_backward_sync(model, enabled=i < len(micro_batches) - 1):
            logits = model(_to(mb["input_ids"], fabric), doc_mask=_doc_mask(mb, hp, fabric))
            ce, objective = token_losses(logits, _to(mb["labels"], fabric), hp["z_loss"])
            del logits  # the loss keeps only its gradient: the logits can go before backward
            fabric.backward(objective * (W / global_real))
        loss_sum += ce
    grad_norm = fabric.clip_gradients(model, optimizer, max_norm=hp["grad_clip"] or float("inf"),
                                       error_if_nonfinite=False)  # non-finite steps are skipped below
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    # One collective and one host sync per step: the loss, and whether any rank was asked to stop (so that all ranks
    # stop after the same step). A non-finite step is skipped on the device by the fused AdamW itself (`found_inf`,
    # the hook GradScaler uses), so the update is queued before the host reads anything.
    loss_and_stop = fabric.all_reduce(torch.stack([loss_sum, torch.full_like(loss_sum, stop_signal)]), reduce_op="sum")
    finite = torch.isfinite(loss_and_stop[0]) & torch.isfinite(grad_norm)
    getattr(optimizer, "optimizer", optimizer).found_inf = (~finite).float()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss_total, norm, stop, tokens = torch.stack([loss_and_stop[0], grad_norm.float(), loss_and_stop[1],
                                                  global_real]).tolist()
    return StepResult(loss_total / tokens, norm, int(tokens), stop > 0)


def save(fabric: Fabric, hp: dict, config: Config, model, optimizer, progress: Progress,
         train_data: PackedDataset, datapoints: DatapointLogger) -> None:
    datapoints.flush(progress.step)
    rng = gather(RNGState().state_dict())  # one state per rank, in rank order
    G = hp["global_batch_size"]
    meta = {"step_count": progress.step, "iter_num": progress.iter_num, "tokens_seen": progress.tokens_seen,
            "skipped_steps": progress.skipped, "world_size": fabric.world_size, "rng": rng, "hparams": hp,
            "config": config.to_dict(),
            "data": {"global_batch_size": G, "samples_seen": progress.step * G, "manifest": train_data.manifest}}
    path = RunDir(hp["out_dir"]).checkpoint(progress.step)
    save_checkpoint(path, model, optimizer, meta, hp["state_dict_type"], keep_last=hp["keep_last_checkpoints"])
    fabric.print(f"Saved {path}")


class RunLog:
    """Everything a step reports: metrics.jsonl/.csv, TensorBoard/W&B, the console line, tokens/s and MFU."""

    def __init__(self, fabric: Fabric, hp: dict, monitor: SpeedMonitor, metrics: MetricsLog,
                 loggers: RunLoggers, start: Progress) -> None:
        self.fabric, self.hp, self.monitor, self.metrics, self.loggers = fabric, hp, monitor, metrics, loggers
        self.start_time = time.perf_counter()
        monitor.update(start.step, start.tokens_seen)

    def step(self, progress: Progress, result: StepResult, lr: float) -> None:
        hp, fabric = self.hp, self.fabric
        if not result.finite:
            fabric.print(f"step {progress.step}: update skipped: non-finite " + " and ".join(
                f"{name} ({value})" for name, value in (("loss", result.loss), ("gradient norm", result.grad_norm))
                if not math.isfinite(value)))
        if progress.step % hp["log_interval"] and progress.step != hp["max_steps"]:
            return
        self.monitor.update(progress.step, progress.tokens_seen)
        elapsed = time.perf_counter() - self.start_time
        eta = self.monitor.eta_seconds(hp["max_steps"])
        memory = (torch.cuda.max_memory_allocated() if fabric.device.type == "cuda" else _rss_bytes()) / 2**30
        tps, smoothed, mfu = self.monitor.tokens_per_sec(), self.monitor.smoothed_tokens_per_sec(), self.monitor.mfu()
        record = {"iter": progress.iter_num, "step": progress.step,
                  "loss": result.loss if math.isfinite(result.loss) else None, "lr": lr,
                  "grad_norm": result.grad_norm if math.isfinite(result.grad_norm) else None,
                  "tokens": progress.tokens_seen, "tokens_per_sec": tps,
                  "tokens_per_sec_smoothed": smoothed, "mfu": mfu, "skipped_steps": progress.skipped,
                  "memory_gb": memory, "time": elapsed}
        self.metrics.write(record)
        self.loggers.log({k: v for k, v in record.items() if v is not None and k not in ("step", "time")},
                         progress.step)
        fabric.print(f"step {progress.step}/{hp['max_steps']} | loss {result.loss:.4f} | lr {lr:.2e} | "
                     f"grad {result.grad_norm:.3f}" + (f" | {tps:,.0f} tok/s ({smoothed:,.0f} smoothed)" if tps else "")
                     + (f" | MFU {mfu:.1%}" if mfu else "") + f" | mem {memory:.1f} GiB"
                     + (f" | ETA {eta / 60:.1f} min" if eta is not None else ""))

    def validation(self, model, val_data: PackedDataset, progress: Progress) -> None:
        val_loss = validate(self.fabric, model, val_data, self.hp)
        self.metrics.write({"iter": progress.iter_num, "step": progress.step, "val_loss": val_loss})
        self.loggers.log({"val_loss": val_loss}, progress.step)
        self.fabric.print(f"step {progress.step} | val loss {val_loss:.4f} | "
                          f"val ppl {math.exp(min(val_loss, 50)):.1f}")


def train(fabric: Fabric, hp: dict, config: Config, launcher: str, closing: list) -> int:
    """The run, top to bottom; what must be closed however it ends (loggers, profiler) is appended to `closing`."""
    out_dir = Path(hp["out_dir"])
    rank, W = fabric.global_rank, fabric.world_size
    fabric.seed_everything(hp["seed"])  # identical initial weights on every rank
    # Installed before the (possibly long) setup: a signal's default action would kill the job without a save.
    preemption = Preemption()
    train_data, val_data = load_data(fabric, hp, config)
    model, optimizer, n_params = build_model(fabric, hp, config)
    resume_path, progress = restore(fabric, hp, config, model, optimizer, train_data)
    if progress.step >= hp["max_steps"]:  # a finished run started again (e.g. a requeued job): nothing to add
        fabric.print(f"{resume_path} is at step {progress.step}, the run's last (--max_steps {hp['max_steps']}); "
                     f"nothing to train")
        return 0
    with blamed_on("out_dir"):  # an unreadable metrics.jsonl stops the run before anything changes
        existing_metrics = read_metrics(RunDir(out_dir).metrics_jsonl, fabric.print) if rank == 0 else None

    # Every check that can refuse this run is behind us (the datapoint log's, in its constructor, is the last): only
    # now does anything in out_dir change.
    resume_step = progress.step if resume_path is not None else None
    with blamed_on("train_data_dir"):  # the run was logged with other data
        datapoints = DatapointLogger(out_dir, rank=rank, world_size=W, dataset=train_data, resume_step=progress.step)
    if rank == 0:
        write_run_files(out_dir, hp, config, {"world_size": W, "launched_by": launcher, "num_parameters": n_params})
        if resume_path is not None:
            set_aside_checkpoints_after(out_dir, progress.step, fabric.print)
    names = hp["logger"].split(",")
    metrics = MetricsLog(out_dir, resume_step=resume_step, enabled=rank == 0, log=fabric.print,
                         existing=existing_metrics, write_csv="csv" in names)
    loggers = RunLoggers(out_dir, names, resume_step, enabled=rank == 0, wandb_options=dict(
        project=hp["wandb_project"], name=hp["wandb_name"], entity=hp["wandb_entity"],
        tags=[t for t in hp["wandb_tags"].split(",") if t]))
    closing.append(loggers)
    loggers.log_hparams({**hp, **config.to_dict()})
    peak = device_peak_flops(fabric.device)
    log = RunLog(fabric, hp, SpeedMonitor(flops_per_token(config, n_params), W, peak), metrics, loggers, progress)
    fabric.print(f"{hp['model_name']}: {n_params / 1e6:.1f}M parameters | world_size={W} ({launcher}) | "
                 f"{hp['global_batch_size']} samples x {config.block_size} tokens per step | {hp['max_steps']} steps")
    if peak:
        fabric.print(f"MFU: {MFU_CONVENTION} ({matmul_parameters(config, n_params) / 1e6:.1f}M), over "
                     f"{peak / 1e12:.0f} TFLOP/s dense bf16 per {torch.cuda.get_device_name(fabric.device)}")
    profile = ProfileWindow(hp["profile_steps"], out_dir, rank, fabric.device)
    closing.append(profile)  # a run that stops inside the window keeps what was recorded

    if val_data is not None and progress.step == 0:
        log.validation(model, val_data, progress)  # the untrained baseline
    batches = iter(StepLoader(train_data, global_batch_size=hp["global_batch_size"],
                              micro_batch_size=hp["micro_batch_size"], rank=rank, world_size=W,
                              start_step=progress.step, num_workers=hp["num_workers"]))
    lr_at = LRSchedule(hp["learning_rate"], hp["min_lr"], hp["warmup_steps"], hp["max_steps"], hp["lr_schedule"],
                       hp["decay_fraction"])
    nonfinite_in_a_row = 0
    while progress.step < hp["max_steps"]:
        profile.step(progress.step)
        try:  # a damaged chunk (or one of another tokenizer) is found when a rank first reads it
            data_step, micro_batches = next(batches)
            data_error = None
        except ValueError as e:
            data_step, micro_batches, data_error = progress.step, [], e
        assert data_step == progress.step, f"data loader at step {data_step}, trainer at {progress.step}"
        lr = lr_at(progress.step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        result = train_step(fabric, model, optimizer, micro_batches, data_error, hp, preemption.requested)
        datapoints.record(progress.step, torch.cat([mb["sample_index"] for mb in micro_batches]))
        nonfinite_in_a_row = 0 if result.finite else nonfinite_in_a_row + 1
        progress = Progress(progress.step + 1, progress.iter_num + len(micro_batches),
                            progress.tokens_seen + result.tokens, progress.skipped + (not result.finite))
        log.step(progress, result, lr)
        if nonfinite_in_a_row >= hp["max_nonfinite_steps"]:
            good = latest_checkpoint(out_dir)
            fabric.print(f"error: {nonfinite_in_a_row} consecutive non-finite steps; stopping. "
                         + (f"The last good checkpoint is {good}" if good else "No checkpoint was written before."),
                         file=sys.stderr)
            return 1
        step = progress.step
        if val_data is not None and hp["eval_interval"] and step % hp["eval_interval"] == 0 and step < hp["max_steps"]:
            log.validation(model, val_data, progress)
        stop_now = result.stop_requested or step == hp["stop_at_step"]
        if ((step % hp["save_interval"] == 0 or step == hp["max_steps"]) and not nonfinite_in_a_row) or stop_now:
            save(fabric, hp, config, model, optimizer, progress, train_data, datapoints)
        if stop_now:
            if preemption.requested and launcher == "slurm" and rank == 0 and "SLURM_JOB_ID" in os.environ:
                fabric.print(f"Pre-empted: requeueing Slurm job {os.environ['SLURM_JOB_ID']}")
                subprocess.run(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]], check=False)
            fabric.print(f"Stopped at step {step}; resume with --resume auto")
            return 0
    profile.step(progress.step)
    if val_data is not None:
        log.validation(model, val_data, progress)
    return 0


def _rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(argv: list[str] | None = None) -> int:
    hp, config = CLI_ARGS if argv is None and CLI_ARGS is not None else cli(argv)
    out_dir = Path(hp["out_dir"])
    existed = out_dir.exists()
    try:
        accel, devices, nodes, launcher = resolve_world(hp)
        check_inputs(hp, config, devices * nodes)
        if hp["dry_run"]:  # the remaining checks and the report; nothing is built or written
            return preflight.dry_run(hp, config, accel, devices, nodes)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.set_float32_matmul_precision("high")
    fabric = Fabric(accelerator=accel, devices=devices, num_nodes=nodes, precision=hp["precision"],
                    strategy=make_strategy(hp["strategy"], devices * nodes, nodes, hp["sharding_strategy"]))
    fabric.launch()
    closing: list = []  # loggers and the profiler window, closed however the run ends
    try:
        return train(fabric, hp, config, launcher, closing)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        if not existed and fabric.global_rank == 0:
            _remove_empty_dirs(out_dir)  # a failed start leaves no trace
        return 2
    except SaveError as e:  # e.g. a full disk: the earlier checkpoints are kept
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        for item in closing:
            item.close()


def _remove_empty_dirs(root: Path) -> None:
    for path in sorted((p for p in [root, *root.rglob("*")] if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if not any(path.iterdir()):
            path.rmdir()


if __name__ == "__main__":
    sys.exit(main())
