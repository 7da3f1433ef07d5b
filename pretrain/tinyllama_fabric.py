"""Pretrain a Llama-style model with Lightning Fabric (FSDP, FSDP2, DDP or one device; CUDA or CPU).

    srun apptainer exec llammlein.sif python pretrain/tinyllama_fabric.py [--name value ...] [--config run.yaml]
    python pretrain/tinyllama_fabric.py --resume out/NAME/iter-00100000-ckpt.pth     # or --resume auto

Every hyperparameter of `TrainConfig` below can be overridden as `--name value` or from a YAML file (`--config`);
switches work bare or with a value (`--compile`, `--compile false`); any field of `lit_gpt.Config` overrides the named
model (`--n_layer 2 --n_embd 64`). `--help` lists them all, `--print_config` prints what was set as YAML for
`--config` (nothing derived: out_dir still follows model_name). Checkpoints are named after the optimizer step:
iter-{step:08d}-ckpt.pth.
"""
from __future__ import annotations

import time

STARTED = time.perf_counter()  # goodput counts the start-up (imports included) as unproductive time

import dataclasses
import math
import sys
from dataclasses import asdict, dataclass, fields
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from jsonargparse.typing import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, restricted_number_type

# Only pure-Python imports until the flags are checked; torch and Lightning follow below (hence E402 there).
from lit_gpt.cli import arg, changed_settings_yaml, make_parser, parse
from lit_gpt.config import AttnImpl, Config
from lit_gpt.errors import InputError
from lit_gpt.profiling import parse_window
from lit_gpt.slurm_eval import check_sbatch_args

UnitIntervalOpenAbove = restricted_number_type("UnitIntervalOpenAbove", float, [(">=", 0), ("<", 1)])  # [0, 1)
UnitIntervalOpenBelow = restricted_number_type("UnitIntervalOpenBelow", float, [(">", 0), ("<=", 1)])  # (0, 1]
Seed = restricted_number_type("Seed", int, [(">=", 0), ("<=", 2**32 - 1)])  # what numpy and Lightning accept
LOGGERS = ("tensorboard", "wandb", "csv")


# ---------------------------------------------------------------------------------------------------------------
# Hyperparameters (LLäMmlein 1B defaults). Edit here, or override: --name value / --config run.yaml.
@dataclass
class TrainConfig:
    model_name: str = arg("LLaMmlein_1B", "registered model (lit_gpt/config.py), e.g. LLaMmlein_120M, LLaMmlein_7B, "
                                          "micro")
    out_dir: str = arg("", "checkpoints, logs and run records; empty: out/MODEL_NAME")
    train_data_dir: str = arg("data/train", "prepared training split(s); comma-separated for several sources")
    train_data_weights: str = arg("", "mixing weights, one per training source, comma-separated; empty: "
                                      "proportional to size")
    val_data_dir: str = arg("data/val", "prepared validation split; empty: no validation")
    tokenizer_path: str = arg("tokenizer", "directory with tokenizer.json / tokenizer.model, copied into out_dir; "
                                           "empty: no check")
    init_from: str = arg("", 'converted checkpoint (.pth with "model") to start from: weights only, fresh optimizer')
    resume: str = arg("", 'checkpoint to continue from, "auto" (newest good one in out_dir, if any) or empty')
    allow_unverified: bool = arg(False, "--resume: also take a sharded checkpoint without checksums.sha256 (written "
                                        "by an older version), after checking its files against its DCP metadata")
    # Batch and schedule
    global_batch_size: PositiveInt = arg(512, "samples per optimizer step, over all ranks")
    micro_batch_size: PositiveInt = arg(8, "samples per forward pass on one rank")
    max_steps: NonNegativeInt = arg(100_000, "optimizer steps of the whole run (sets the LR schedule)")
    max_tokens: NonNegativeInt = arg(0, ">0: sets max_steps to ceil(max_tokens / (global_batch_size * block_size))")
    stop_at_step: NonNegativeInt = arg(0, ">0: checkpoint and exit after this step (one run over several jobs)")
    learning_rate: PositiveFloat = arg(4e-4, "peak learning rate, reached after warmup")
    min_lr: NonNegativeFloat = arg(4e-5, "learning rate at the end of the decay")
    warmup_steps: NonNegativeInt = arg(2000, "optimizer steps of linear warmup")
    lr_schedule: Literal["cosine", "wsd"] = arg("cosine", "cosine decay, or warmup-stable-decay")
    decay_fraction: UnitIntervalOpenBelow = arg(0.2, "wsd: share of max_steps spent in the final linear decay")
    weight_decay: NonNegativeFloat = arg(0.1, "AdamW decoupled weight decay (norms and biases are never decayed)")
    decay_embeddings: bool = arg(False, "also decay the token embedding")
    beta1: UnitIntervalOpenAbove = arg(0.9, "AdamW beta1")
    beta2: UnitIntervalOpenAbove = arg(0.95, "AdamW beta2")
    adam_eps: PositiveFloat = arg(1e-8, "AdamW epsilon")
    grad_clip: NonNegativeFloat = arg(1.0, "clip the global gradient norm to this; 0: no clipping (the norm is "
                                           "still logged)")
    z_loss: NonNegativeFloat = arg(0.0, "weight of the softmax normaliser penalty (PaLM z-loss); 0 disables it")
    max_nonfinite_steps: PositiveInt = arg(5, "stop after this many consecutive steps with a non-finite loss or "
                                              "gradient")
    document_masking: bool = arg(False, "attend only within each packed document; RoPE positions restart per "
                                        "document")
    # Logging, evaluation, checkpoints
    log_interval: PositiveInt = arg(10, "optimizer steps between log lines and metrics records")
    eval_interval: NonNegativeInt = arg(1000, "optimizer steps between validations; 0: only at the end")
    eval_iters: PositiveInt = arg(25, "validation batches of global_batch_size samples")
    save_interval: PositiveInt = arg(5000, "optimizer steps between checkpoints")
    keep_last_checkpoints: NonNegativeInt = arg(3, "checkpoints kept in out_dir; 0 keeps all")
    logger: str = arg("tensorboard,csv", f"comma-separated from {', '.join(LOGGERS)} (metrics.jsonl is always "
                                         f"written)")
    wandb_project: str = arg("llammlein", "W&B project")
    wandb_entity: str = arg("", "W&B team or user; empty: your default entity")
    wandb_name: str = arg("", "W&B run name; empty: the out_dir's name")
    wandb_tags: str = arg("", "W&B tags, comma-separated")
    profile_steps: str = arg("", "START:END records a torch.profiler trace of those steps (+ CUDA memory) in "
                                 "out_dir/profile")
    dry_run: bool = arg(False, "run the pre-flight checks, print the run's size, memory per GPU and wall time, and "
                               "exit (1 when it does not fit --gpu_memory_gb)")
    gpu_memory_gb: PositiveFloat = arg(80.0, '--dry_run: memory of one GPU in GiB, for "fits" and the largest micro '
                                             'batch')
    assumed_mfu: UnitIntervalOpenBelow = arg(0.4, "--dry_run: model FLOPs utilisation the wall time is estimated at")
    # Parallelism and performance
    accelerator: Literal["auto", "cuda", "cpu"] = arg("auto", "auto: cuda when a GPU is visible")
    devices: Literal["auto"] | PositiveInt = arg("auto", "processes (GPUs) per node: auto (all GPUs; 1 on CPU) or a "
                                                         "count; Slurm's under srun")
    num_nodes: PositiveInt = arg(1, "nodes; Slurm's under srun")
    dist_timeout_s: PositiveInt = arg(1800, "seconds a rank waits for the others (at start-up and in every collective) "
                                            "before the run fails; training steps are bounded sooner by "
                                            "--hang_factor")
    strategy: Literal["fsdp", "fsdp2", "ddp", "auto"] = arg("fsdp", "auto is a single device")
    sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD"] = arg(
        "SHARD_GRAD_OP", "FSDP/FSDP2 sharding")
    state_dict_type: Literal["full", "sharded"] = arg("full", "one .pth file, or a torch distributed checkpoint "
                                                             "directory")
    # No "16-mixed": its gradient scaler refuses clipping with the fused AdamW on CUDA, and a skipped non-finite step
    # (no optimizer.step, so no scaler.update) would never lower the loss scale. On CPU Fabric silently ran it as bf16.
    precision: Literal["bf16-mixed", "bf16-true", "32-true"] = arg("bf16-mixed", "training precision")
    activation_checkpointing: bool = arg(False, "recompute each Block's activations in backward (memory for compute)")
    attn_impl: AttnImpl = arg("auto", "attention kernel; auto: the fastest that runs")
    compile: bool = arg(False, "torch.compile each Block")
    meta_init: Literal["auto", "true", "false"] = arg("auto", "build on the meta device, initialise sharded; auto: "
                                                             "FSDP and > 2B params")
    num_workers: NonNegativeInt = arg(2, "data loader processes per rank")
    cache_dir: str = arg("", "node-local cache for chunks (e.g. /dev/shm/llammlein); empty: read in place")
    cache_max_gb: NonNegativeFloat = arg(0.0, "size limit of the node-local cache in GiB; 0: no limit")
    verify_data: bool = arg(False, "hash every chunk against its manifest's sha256 before training (ranks share the "
                                   "work)")
    seed: Seed = arg(42, "seed of the initial weights and the sample order")
    # Asynchronous checkpoints (lit_gpt.checkpoint.async_save)
    async_checkpoint: Literal["auto", "true", "false"] = arg("auto", "write sharded checkpoints in the background "
                                                                    "while training goes on; auto: on for "
                                                                    "--state_dict_type sharded")
    # Hang detection and stragglers (lit_gpt/watchdog.py, lit_gpt/stragglers.py). --dist_timeout_s stays the bound of
    # start-up, the first steps, validation and checkpoints; these bound a training step once the run is under way.
    hang_factor: NonNegativeFloat = arg(10.0, "a training step (after the first 3) taking longer than this many times "
                                              "the median step is a hang: each rank dumps its stacks into "
                                              "out_dir/hang-STEP, rank 0 names the ranks that did not arrive at the "
                                              "step's collective, and the run exits with code 75; 0: off")
    hang_min_s: PositiveFloat = arg(300.0, "no step counts as a hang before this many seconds")
    straggler_pct: PositiveFloat = arg(50.0, "each log interval, name the ranks whose median step compute time "
                                             "(without waiting for others) is this many percent above the median "
                                             "rank's")
    # Loss-spike rollback (lit_gpt.rollback, lit_gpt.spikes)
    max_rollbacks: NonNegativeInt = arg(3, "on a loss spike (or --max_nonfinite_steps non-finite steps in a row) go "
                                           "back to the newest good checkpoint before it and skip the spike's data, "
                                           "at most this often (then stop); 0: no rollback")
    spike_window: PositiveInt = arg(100, "a spike is a loss above the mean of the last this many steps' losses ...")
    spike_sigma: PositiveFloat = arg(6.0, "... by more than this many of their standard deviations")
    spike_skip_steps: PositiveInt = arg(10, "a rollback skips the data of the spike's step and of the steps before "
                                            "it, this many in all (none before the checkpoint)")
    # lm-eval tasks scored in-process on the live model (lit_gpt/train_tasks.py)
    eval_tasks: str = arg("", "lm-eval task names or task directories (e.g. eval/tasks/llammlein_de), "
                              "comma-separated; empty: none")
    eval_task_interval: NonNegativeInt = arg(0, "optimizer steps between --eval_tasks runs; 0: only at the end (they "
                                                "also run at the end)")
    eval_limit: NonNegativeInt = arg(0, "--eval_tasks: items per task; 0: all")
    eval_batch_size: PositiveInt = arg(8, "--eval_tasks: requests per forward pass on one rank")
    # ... or by Slurm jobs, one per checkpoint (lit_gpt/slurm_eval.py)
    eval_submit_slurm: bool = arg(False, "score each checkpoint on --eval_tasks in a Slurm job of its own "
                                         "(cluster/exec/evaluate.sbatch; scores in out_dir/evals/) instead of in the "
                                         "training process; a failed sbatch is a warning")
    eval_sbatch_args: str = arg("", "--eval_submit_slurm: extra sbatch options, e.g. "
                                    "--eval_sbatch_args='--partition=gpu --account=proj'")
# ---------------------------------------------------------------------------------------------------------------

    def __post_init__(self) -> None:
        """What the annotations cannot say; the parser has checked types, choices and bounds."""
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise InputError(f"--{f.name} must be a finite number, got {value}")
        if self.spike_window < 2:  # one loss has no spread
            raise InputError(f"--spike_window must be >= 2, got {self.spike_window}")
        unknown = [name for name in self.loggers if name not in LOGGERS]
        if unknown:
            raise InputError(f"--logger: {', '.join(map(repr, unknown))} not among {', '.join(LOGGERS)}")
        try:
            parse_window(self.profile_steps)
        except ValueError as e:  # parse_window reads nothing else: its ValueError is about this flag
            raise InputError(f"--profile_steps: {e}") from None
        if self.async_checkpoint == "true" and self.state_dict_type == "full":
            raise InputError("--async_checkpoint true needs --state_dict_type sharded (a full checkpoint is one file "
                             "written by rank 0, synchronously)")
        if self.eval_submit_slurm and not self.eval_tasks.strip(","):
            raise InputError("--eval_submit_slurm scores each checkpoint on --eval_tasks: give the tasks")
        try:
            check_sbatch_args(self.eval_sbatch_args)
        except ValueError as e:
            raise InputError(f"--eval_sbatch_args {self.eval_sbatch_args!r}: {e}") from None
        if self.train_data_weights:
            try:
                weights = self.train_weights
            except ValueError:
                weights = []
            if len(weights) != len(self.train_sources) or not all(math.isfinite(w) and w > 0 for w in weights):
                raise InputError(f"--train_data_weights {self.train_data_weights!r}: expected "
                                 f"{len(self.train_sources)} positive comma-separated numbers, one per "
                                 f"--train_data_dir source")

    @property
    def train_sources(self) -> list[str]:
        return self.train_data_dir.split(",")

    @property
    def train_weights(self) -> list[float] | None:
        """The mixing weights (None: proportional to size); checked against the sources when the config is made."""
        return [float(w) for w in self.train_data_weights.split(",")] if self.train_data_weights else None

    @property
    def async_checkpoints(self) -> bool:
        return self.async_checkpoint == "true" or (self.async_checkpoint == "auto" and self.state_dict_type == "sharded")

    @property
    def loggers(self) -> list[str]:
        return self.logger.split(",")


# ------------------------------------------------- command line ------------------------------------------------
# lit_gpt.Config fields that override the named model; every size there is positive.
MODEL_FIELDS = {f.name: ({"int": PositiveInt, "float": PositiveFloat}[str(f.type).removesuffix(" | None")], f)
                for f in fields(Config) if "help" in f.metadata}


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, dict[str, Any], bool]:
    """(hyperparameters, model overrides, --print_config): defaults < YAML file(s) < command line, typed and checked."""
    parser = make_parser(TrainConfig, __doc__, MODEL_FIELDS, "model config overrides (lit_gpt.Config fields; "
                                                             "default: as --model_name)")
    return parse(parser, TrainConfig, argv, tuple(MODEL_FIELDS))


def resolve(argv: list[str] | None) -> tuple[TrainConfig, Config, str, bool]:
    """(hyperparameters with the derived ones filled in, model config, the YAML of what was set, --print_config).
    The YAML holds the settings that differ from the defaults and the model fields that differ from --model_name's,
    nothing derived (out_dir from model_name, max_steps from max_tokens): fed back with another --model_name, it
    gives that model."""
    cfg, overrides, print_config = parse_args(argv)
    try:
        config = Config.from_name(cfg.model_name, attn_impl=cfg.attn_impl, **overrides)
    except ValueError as e:  # Config's own checks of the fields it was given
        blamed = " ".join(f"--{k} {v}" for k, v in overrides.items())
        raise InputError(f"model config ({blamed}): {e}" if overrides else f"--model_name: {e}") from None
    named = Config.from_name(cfg.model_name).to_dict()
    if config.block_size > named["block_size"]:  # RoPE and the model's shapes were chosen for its context length
        raise InputError(f"--block_size {config.block_size} is above {cfg.model_name}'s context length "
                         f"{named['block_size']}")
    printed = changed_settings_yaml(cfg, {k: v for k, v in overrides.items() if v != named[k]})
    cfg.out_dir = cfg.out_dir or f"out/{cfg.model_name}"
    if cfg.max_tokens:
        cfg.max_steps = math.ceil(cfg.max_tokens / (cfg.global_batch_size * config.block_size))
    if cfg.max_steps < 1:
        raise InputError(f"--max_steps must be >= 1 (or set --max_tokens), got {cfg.max_steps}")
    if cfg.min_lr > cfg.learning_rate:  # the "decay" would rise
        raise InputError(f"--min_lr {cfg.min_lr} is above --learning_rate {cfg.learning_rate}")
    return cfg, config, printed, print_config


def cli(argv: list[str] | None) -> tuple[TrainConfig, Config]:
    """The checked hyperparameters and model config; exits (code 2) on a bad flag, (0) after --print_config."""
    try:
        cfg, config, printed, print_config = resolve(argv)
        if print_config:
            print(printed, end="")
            sys.exit(0)
        for flag, directory in [("train_data_dir", d) for d in cfg.train_sources] + [("val_data_dir", cfg.val_data_dir)]:
            if directory and not Path(directory).is_dir():  # before anything slow (torch, the tokenizer)
                raise InputError(f"--{flag} {directory}: directory does not exist")
            if directory and not any(Path(directory).glob("*.bin")):
                raise InputError(f"--{flag} {directory}: contains no .bin chunk files (run scripts/prepare_data.py "
                                 f"first)")
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    return cfg, config


CLI_ARGS: tuple[TrainConfig, Config] | None = None
if __name__ == "__main__":
    # --help, --print_config and flag errors answer before torch and Lightning are imported (5-15 s on a busy node).
    # `llammlein-train` runs this file the same way (pretrain/launch.py).
    CLI_ARGS = cli(sys.argv[1:])

import torch
from lightning.fabric import Fabric
from torch.distributed.checkpoint import CheckpointException

from lit_gpt import preflight
from lit_gpt.attention import DocumentMask, resolve_backend
from lit_gpt.benchmarks import set_aside_after as set_aside_benchmarks_after
from lit_gpt.checkpoint import AsyncCheckpointer, SaveError, load_training_state, load_weights, save_checkpoint
from lit_gpt.checkpoint.ranks import gather
from lit_gpt.cli import naming_flag
from lit_gpt.datapoints import DatapointLogger
from lit_gpt.distributed import make_strategy
from lit_gpt.goodput import Goodput
from lit_gpt.loggers import RunLoggers
from lit_gpt.loss import token_losses
from lit_gpt.metrics_log import MetricsLog, missing_final_records, read_metrics
from lit_gpt.model import GPT, num_parameters
from lit_gpt.packed_dataset import PackedDataset, StepLoader
from lit_gpt.preemption import Preemption
from lit_gpt.profiling import ProfileWindow
from lit_gpt.resume import (
    Progress,
    check_original_resumable,
    check_resumable,
    resume_checkpoint,
    set_aside_checkpoints_after,
)
from lit_gpt.rng import RNGState
from lit_gpt.rollback import Rollbacks, keeps_rollbacks_to, rollback_record, samples_of_data_steps
from lit_gpt.run_dir import RunDir, checkpoint_step, remove_empty_dirs
from lit_gpt.run_log import RunLog, write_run_files
from lit_gpt.schedule import LRSchedule, parameter_groups
from lit_gpt.slurm_eval import submit_evaluation
from lit_gpt.speed_monitor import SpeedMonitor, device_peak_flops, flops_per_token
from lit_gpt.spikes import Spike
from lit_gpt.stragglers import StragglerReport
from lit_gpt.train_tasks import TrainTasks
from lit_gpt.watchdog import StepWatch, configure_nccl_flight_recorder, gather_hosts, slow_down_for_test


# ------------------------------------------------- set-up ------------------------------------------------------
def load_data(fabric: Fabric, cfg: TrainConfig, config: Config) -> tuple[PackedDataset, PackedDataset | None]:
    cache = dict(cache_dir=cfg.cache_dir or None, cache_max_bytes=int(cfg.cache_max_gb * 2**30) or None)
    common = dict(block_size=config.block_size, seed=cfg.seed, with_doc_ids=cfg.document_masking,
                  vocab_size=config.vocab_size)
    # Data errors (a source too small for one sample, no document index for masking, a damaged chunk) are
    # InputErrors naming the file; the flag is added here.
    with naming_flag("train_data_dir"):
        train_data = PackedDataset(cfg.train_sources, cfg.train_weights, **common, **cache)
    preflight.check_one_sample(train_data, "train_data_dir")  # names --block_size
    with naming_flag("train_data_dir"):
        if cfg.verify_data:
            fabric.print(f"Verified the checksums of {train_data.verify_checksums()} training chunks")
    val_data = None
    if cfg.val_data_dir:
        with naming_flag("val_data_dir"):
            val_data = PackedDataset([cfg.val_data_dir], None, **common)
        preflight.check_one_sample(val_data, "val_data_dir")
        with naming_flag("val_data_dir"):
            if cfg.verify_data:
                fabric.print(f"Verified the checksums of {val_data.verify_checksums()} validation chunks")
    return train_data, val_data


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # Fused (CUDA and CPU; on CPU 3.5x faster than the per-tensor loop): the training loop relies on its `found_inf`
    # input to skip non-finite steps on the device.
    return torch.optim.AdamW(parameter_groups(model, cfg.weight_decay, cfg.decay_embeddings), lr=cfg.learning_rate,
                             betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, fused=True)


def build_model(fabric: Fabric, cfg: TrainConfig, config: Config):
    """(model, optimizer, parameter count), set up for the strategy; weights from --init_from if given."""
    with naming_flag("attn_impl"):  # an explicitly requested backend that cannot run here stops the run before setup
        resolve_backend(config.attn_impl, fabric.device, torch.bfloat16 if "bf16" in cfg.precision else torch.float32,
                        config.head_size, document_masking=cfg.document_masking, needs_grad=True)
    with torch.device("meta"):
        n_params = num_parameters(GPT(config))
    meta = cfg.meta_init == "true" or (cfg.meta_init == "auto" and cfg.strategy in ("fsdp", "fsdp2")
                                          and n_params > 2e9 and not cfg.init_from)
    with fabric.init_module(empty_init=meta):
        model = GPT(config)
    if cfg.init_from:  # ours (full or sharded), a converted HF model, or one of the original trainer
        try:
            weights = load_weights(cfg.init_from)["model"]
            model.load_state_dict({key: weights[key] for key in weights})
        except Exception as e:  # not a checkpoint, damaged, or another architecture: the same on every rank
            raise InputError(f"--init_from {cfg.init_from}: cannot be loaded into {cfg.model_name} "
                             f"({type(e).__name__}: {str(e).strip()[:500]})") from None
    model.activation_checkpointing = cfg.activation_checkpointing
    if cfg.compile:
        for block in model.transformer.h:
            block.compile()
    # Module first, optimizer second: FSDP2 would otherwise leave the optimizer holding unsharded parameters.
    model = fabric.setup_module(model)
    optimizer = fabric.setup_optimizers(make_optimizer(model, cfg))
    return model, optimizer, n_params


def restore(fabric: Fabric, cfg: TrainConfig, config: Config, model, optimizer, train_data: PackedDataset,
            rollbacks: Rollbacks, path: Path | None = None) -> tuple[Path | None, Progress]:
    """Load the checkpoint to resume from (if any; `path`: this one, for a rollback) into model and optimizer, check
    that this run can continue it and restore the RNG states and the rollback state. Changes nothing in out_dir."""
    if path is None:
        path = resume_checkpoint(cfg.resume, cfg.out_dir, allow_unverified=cfg.allow_unverified)
    if path is None:
        return None, Progress()
    try:
        ckpt = load_training_state(path, model, optimizer)
    except (Exception, CheckpointException) as e:  # the same on every rank: all of them stop with this message
        raise InputError(f"--resume {path}: cannot be loaded into {cfg.model_name} with this optimizer "
                         f"({type(e).__name__}: {str(e).strip()[:500]}); a converted model without optimizer "
                         f"state starts with --init_from") from None
    limits = dict(global_batch_size=cfg.global_batch_size, stop_at_step=cfg.stop_at_step, max_steps=cfg.max_steps)
    if ckpt.get("original"):
        progress = Progress(*check_original_resumable(ckpt, path, block_size=config.block_size, log=fabric.print,
                                                      **limits))
    else:
        progress = Progress(*check_resumable(ckpt, path, data_fingerprint=train_data.manifest["fingerprint"],
                                             train_data_dir=cfg.train_data_dir, **limits))
    # Elastic resume (another world size): per-rank streams cannot carry over; fresh ones are derived deterministically
    saved_rng = ckpt.get("rng") if ckpt.get("world_size") == fabric.world_size else None
    RNGState().resume(saved_rng, fabric.global_rank, fabric.world_size, cfg.seed, progress.step)
    rollbacks.load_state_dict(ckpt)
    writers = ckpt.get("world_size")
    fabric.print(f"Resumed from {path} at step {progress.step} (" + (
        f"written by {writers} rank{'s' if writers != 1 else ''}, now {fabric.world_size})" if writers else
        f"world size not recorded, now {fabric.world_size})"))
    if change := LRSchedule.describe_change(ckpt.get("hparams", {}), asdict(cfg), progress.step):
        fabric.print(change)
    return path, progress


# ------------------------------------------------- one step, validation, checkpoint ----------------------------
def _to(x, fabric: Fabric):
    # The loader pins batches when CUDA is in use: the copy overlaps with compute instead of synchronising.
    return x.to(fabric.device, non_blocking=True)


def _doc_mask(mb: dict, cfg: TrainConfig, fabric: Fabric) -> DocumentMask | None:
    return _to(mb["doc_mask"], fabric) if cfg.document_masking else None


def train_step(fabric: Fabric, model, optimizer, micro_batches: list[dict], data_error: Exception | None,
               cfg: TrainConfig, stop_signal: bool, watch: StepWatch,
               save_written: bool = False) -> tuple[float, float, int, bool, bool]:
    """One optimizer step over this rank's micro-batches of the global batch: (mean loss over the global batch's
    real tokens, gradient norm before clipping, real tokens of the global batch, whether any rank must stop, whether
    every rank has written its part of the checkpoint in flight). `watch` learns when this rank waits in the step's
    collectives (hang reports, straggler times)."""
    W = fabric.world_size
    # Normalise by the real tokens of the whole global batch: every token weighs the same whatever the split into
    # ranks and micro-batches (and padding). A rank whose data could not be read says so in the same collective, so
    # that all ranks stop with the error instead of waiting for each other.
    real = float(sum((mb["labels"] != -100).sum() for mb in micro_batches))
    with watch.collective():
        real_and_error = fabric.all_reduce(torch.tensor([real, data_error is not None], dtype=torch.float32)
                                           .to(fabric.device), reduce_op="sum")
        data_failed = real_and_error[1].item()  # a sync, but the device is idle here: the last step ended with one
    if data_failed:
        raise InputError(f"--train_data_dir: {data_error}" if data_error else
                         "--train_data_dir: another rank found unusable training data (its error names the file)")
    global_real = real_and_error[0].clamp(min=1)
    loss_sum = torch.zeros((), device=fabric.device)
    for i, mb in enumerate(micro_batches):
        with fabric.no_backward_sync(model, enabled=i < len(micro_batches) - 1):
            logits = model(_to(mb["input_ids"], fabric), doc_mask=_doc_mask(mb, cfg, fabric))
            ce, objective = token_losses(logits, _to(mb["labels"], fabric), cfg.z_loss)
            del logits  # the loss keeps only its gradient: the logits can go before backward
            fabric.backward(objective * (W / global_real))
        loss_sum += ce
    grad_norm = fabric.clip_gradients(model, optimizer, max_norm=cfg.grad_clip or float("inf"),
                                       error_if_nonfinite=False)  # non-finite steps are skipped below
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    # One collective and one host sync per step: the loss, whether any rank was asked to stop (so that all ranks
    # stop after the same step) and how many have written the checkpoint in flight (so that all of them publish it
    # after the same step). A non-finite step is skipped on the device by the fused AdamW itself (`found_inf`,
    # the hook GradScaler uses), so the update is queued before the host reads anything.
    # (Up to the host's read of its result: on CUDA the all-reduce returns at once and the read waits for it.)
    with watch.collective():
        loss_and_stop = fabric.all_reduce(torch.stack([loss_sum, torch.full_like(loss_sum, stop_signal),
                                                       torch.full_like(loss_sum, save_written)]), reduce_op="sum")
        finite = torch.isfinite(loss_and_stop[0]) & torch.isfinite(grad_norm)
        getattr(optimizer, "optimizer", optimizer).found_inf = (~finite).float()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_total, norm, stop, written, tokens = torch.stack([loss_and_stop[0], grad_norm.float(), loss_and_stop[1],
                                                               loss_and_stop[2], global_real]).tolist()
    return loss_total / tokens, norm, int(tokens), stop > 0, written == W


def validation_batches(val_data: PackedDataset, cfg: TrainConfig) -> int:
    """Whole batches of global_batch_size samples in the validation split (at least one, padded)."""
    return max(1, val_data.samples_per_epoch // cfg.global_batch_size)


@torch.no_grad()
def validate(fabric: Fabric, model, val_data: PackedDataset, cfg: TrainConfig) -> float:
    """Token-weighted mean validation loss over all ranks, on the first eval_iters batches of global_batch_size
    samples of the validation order: the same samples whatever the world size (fewer when the split is smaller)."""
    model.eval()
    W, G = fabric.world_size, cfg.global_batch_size
    iters = min(cfg.eval_iters, validation_batches(val_data, cfg))
    loader = StepLoader(val_data, global_batch_size=G, micro_batch_size=cfg.micro_batch_size,
                        rank=fabric.global_rank, world_size=W, start_step=0, num_workers=0)
    totals = torch.zeros(2, device=fabric.device, dtype=torch.float64)
    for (_, micro_batches), _ in zip(loader, range(iters)):
        for mb in micro_batches:
            logits = model(_to(mb["input_ids"], fabric), doc_mask=_doc_mask(mb, cfg, fabric))
            labels = _to(mb["labels"], fabric)
            totals[0] += token_losses(logits, labels, 0.0)[0].double()
            totals[1] += (labels != -100).sum()
    totals = fabric.all_reduce(totals, reduce_op="sum")
    model.train()
    return (totals[0] / totals[1].clamp(min=1)).item()


def save(fabric: Fabric, cfg: TrainConfig, config: Config, model, optimizer, progress: Progress,
         train_data: PackedDataset, datapoints: DatapointLogger, rollbacks: Rollbacks,
         checkpointer: AsyncCheckpointer | None) -> None:
    """Checkpoint this step; with `checkpointer`, the write goes on in the background (the datapoints up to this step
    are flushed now either way: a resume from an earlier checkpoint sets them aside)."""
    datapoints.flush(progress.step)
    G = cfg.global_batch_size
    meta = {**progress.state_dict(), **rollbacks.state_dict(), "world_size": fabric.world_size,
            "rng": gather(RNGState().state_dict()),
            "hparams": asdict(cfg), "config": config.to_dict(),
            "data": {"global_batch_size": G, "samples_seen": progress.step * G, "manifest": train_data.manifest}}
    path = RunDir(cfg.out_dir).checkpoint(progress.step)
    if checkpointer is not None:
        checkpointer.start(path, model, optimizer, meta)  # published (and `published` called) after a later step
        return
    save_checkpoint(path, model, optimizer, meta, cfg.state_dict_type, keep_last=cfg.keep_last_checkpoints)
    fabric.print(f"Saved {path}")
    published(fabric, cfg, path)


def published(fabric: Fabric, cfg: TrainConfig, path: Path) -> None:
    """A checkpoint is in place under its final name: its evaluation job can start at once."""
    if cfg.eval_submit_slurm and fabric.global_rank == 0:
        submit_evaluation(path, cfg.eval_tasks, Path(cfg.out_dir), limit=cfg.eval_limit or None,
                          batch_size=cfg.eval_batch_size, sbatch_args=cfg.eval_sbatch_args, log=fabric.print)


# ------------------------------------------------- the run -----------------------------------------------------
def train(fabric: Fabric, cfg: TrainConfig, config: Config, launcher: str, closing: list) -> int:
    """The run, top to bottom; what must be closed however it ends (loggers, profiler) is appended to `closing`."""
    run = RunDir(cfg.out_dir)
    rank, W = fabric.global_rank, fabric.world_size
    goodput = Goodput(started=STARTED)
    fabric.seed_everything(cfg.seed)  # identical initial weights on every rank
    preemption = Preemption()  # before the (possibly long) set-up: a signal would otherwise kill the job unsaved
    train_data, val_data = load_data(fabric, cfg, config)
    tasks = TrainTasks(cfg.eval_tasks, cfg.eval_task_interval, cfg.eval_limit, cfg.eval_batch_size,
                       cfg.tokenizer_path, fabric.device)  # an unknown task or one not available offline stops here
    if val_data is not None and validation_batches(val_data, cfg) < cfg.eval_iters:
        fabric.print(f"--eval_iters {cfg.eval_iters}: the validation split holds {validation_batches(val_data, cfg)} "
                     f"batches of --global_batch_size {cfg.global_batch_size} samples; each validation uses those")
    model, optimizer, n_params = build_model(fabric, cfg, config)
    rollbacks = Rollbacks(cfg.spike_window, cfg.spike_sigma, cfg.max_nonfinite_steps, cfg.max_rollbacks,
                          cfg.spike_skip_steps)
    resume_path, progress = restore(fabric, cfg, config, model, optimizer, train_data, rollbacks)
    with naming_flag("out_dir"):  # an unreadable metrics.jsonl stops the run before anything changes
        existing_metrics = read_metrics(run.metrics_jsonl, fabric.print) if rank == 0 else None
    final_missing = ["step", "validation", "tasks"]  # what the run's end writes
    if progress.step >= cfg.max_steps:  # a finished run started again (e.g. a requeued job)
        final_missing = fabric.broadcast(missing_final_records(
            existing_metrics[0], cfg.max_steps, validated=val_data is not None,
            scored=bool(tasks) and not cfg.eval_submit_slurm) if rank == 0 else None)
        if not final_missing:
            fabric.print(f"{resume_path} is at step {progress.step}, the run's last (--max_steps {cfg.max_steps}); "
                         f"nothing to train")
            return 0
        fabric.print(f"{resume_path} is at step {progress.step}, the run's last, but its final records are missing "
                     f"(killed before the final {' and '.join(final_missing)}): writing them")

    # Every check that can refuse this run is behind us (the datapoint log's, in its constructor, is the last): only
    # now does anything in out_dir change.
    resume_step = progress.step if resume_path is not None else None
    with naming_flag("train_data_dir"):  # the run was logged with other data
        datapoints = DatapointLogger(run.path, rank=rank, world_size=W, dataset=train_data, resume_step=progress.step)
    if rank == 0:
        write_run_files(run, {**asdict(cfg), "world_size": W, "launched_by": launcher, "num_parameters": n_params},
                        config, cfg.tokenizer_path)
        if resume_path is not None:
            set_aside_checkpoints_after(run.path, progress.step, fabric.print)
        set_aside_benchmarks_after(run.path, progress.step, fabric.print)  # after their checkpoints: see there
    metrics = MetricsLog(run.path, resume_step=resume_step, enabled=rank == 0, log=fabric.print,
                         existing=existing_metrics, write_csv="csv" in cfg.loggers)
    loggers = RunLoggers(run.path, cfg.loggers, resume_step, enabled=rank == 0, wandb_options=dict(
        project=cfg.wandb_project, name=cfg.wandb_name, entity=cfg.wandb_entity,
        tags=[t for t in cfg.wandb_tags.split(",") if t]))
    closing.append(loggers)
    peak = device_peak_flops(fabric.device)
    log = RunLog(SpeedMonitor(flops_per_token(config, n_params), W, peak), metrics, loggers, progress,
                 cfg.log_interval, cfg.max_steps, fabric.device, fabric.print)
    log.hparams({**asdict(cfg), **config.to_dict()})
    log.describe(cfg.model_name, config, n_params, f"world_size={W} ({launcher})", cfg.global_batch_size)
    profile = ProfileWindow(cfg.profile_steps, run.path, rank, fabric.device)
    closing.append(profile)  # a run that stops inside the window keeps what was recorded
    lr_at = LRSchedule.from_settings(asdict(cfg))
    checkpointer = None
    if cfg.async_checkpoints:  # closing it abandons a write still in flight when the run ends by an exception
        checkpointer = AsyncCheckpointer(cfg.keep_last_checkpoints, fabric.print, timedelta(seconds=cfg.dist_timeout_s),
                                         on_published=lambda path: published(fabric, cfg, path))
        closing.append(checkpointer)

    if rank == 0 and existing_metrics[0]:  # steps up to the last record had been trained (at least) before
        goodput.lost_until(max(r["step"] for r in existing_metrics[0]))
    if val_data is not None and progress.step == 0:
        with goodput.phase("validation"):
            log.validation(progress, validate(fabric, model, val_data, cfg))  # the untrained baseline
    batches = step_batches(train_data, cfg, rank, W, progress.step, rollbacks)
    hosts = gather_hosts(fabric)
    watch = StepWatch(run.path, rank, hosts, cfg.hang_factor, cfg.hang_min_s, cfg.dist_timeout_s)
    stragglers = StragglerReport([host for host, _ in hosts], cfg.straggler_pct, log=fabric.print)
    closing += [watch, stragglers]  # the straggler summary is the run's last line
    while progress.step < cfg.max_steps:
        profile.step(progress.step)
        watch.begin(progress.step + 1)  # steps are named after the optimizer step they make, as checkpoints are
        slow_down_for_test(rank, progress.step + 1)
        with goodput.training_step(progress.step):
            try:  # a damaged chunk (or one of another tokenizer) is found when a rank first reads it
                data_step, micro_batches = next(batches)
                data_error = None
            except InputError as e:  # names the file; anything else is a bug and propagates with its traceback
                data_step, micro_batches, data_error = progress.step, [], e
            assert data_step == progress.step, f"data loader at step {data_step}, trainer at {progress.step}"
            lr = lr_at(progress.step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss, grad_norm, tokens, stop_requested, save_written = train_step(
                fabric, model, optimizer, micro_batches, data_error, cfg,
                preemption.requested or log.failure is not None, watch,
                checkpointer is not None and checkpointer.done_locally())
            stragglers.add(watch.end())
            if save_written:  # every rank's write is done: all of them publish it now
                with goodput.phase("checkpoint"):
                    checkpointer.finish()
            datapoints.record(progress.step, torch.cat([mb["sample_index"] for mb in micro_batches]))
            finite = math.isfinite(loss) and math.isfinite(grad_norm)
            progress = dataclasses.replace(progress, step=progress.step + 1,
                                           iter_num=progress.iter_num + len(micro_batches),
                                           tokens_seen=progress.tokens_seen + tokens,
                                           skipped=progress.skipped + (not finite))
            log.step(progress, loss, grad_norm, lr, stragglers.gather(fabric) if log.logs_at(progress.step) else None,
                     extra={"goodput": goodput.share()})
        if spike := rollbacks.observe(progress.step, loss, finite):  # the same on every rank: the loss is all-reduced
            went_back = roll_back(fabric, cfg, config, model, optimizer, train_data, rollbacks, spike, run, log,
                                  goodput, checkpointer)
            if went_back is None:
                return 1
            progress, datapoints = went_back  # a stop request is answered after the next step, with its checkpoint
            batches = step_batches(train_data, cfg, rank, W, progress.step, rollbacks)
            continue
        step = progress.step
        if val_data is not None and cfg.eval_interval and step % cfg.eval_interval == 0 and step < cfg.max_steps:
            with goodput.phase("validation"):
                log.validation(progress, validate(fabric, model, val_data, cfg))
        if tasks.due(step, cfg.max_steps) and not cfg.eval_submit_slurm:  # else the jobs of the checkpoints score
            with goodput.phase("evaluation"):
                log.task_scores(progress, *tasks.run(model))
        stop_now = stop_requested or step == cfg.stop_at_step
        saving = ((step % cfg.save_interval == 0 or step == cfg.max_steps)
                  and not rollbacks.detector.nonfinite_in_a_row) or stop_now
        if saving and (failure := fabric.broadcast(log.failure, src=0)):  # no checkpoint past a lost record
            return log.stop_records_lost(failure, step, run)
        if saving:
            with goodput.phase("checkpoint"):
                save(fabric, cfg, config, model, optimizer, progress, train_data, datapoints, rollbacks, checkpointer)
        if stop_now:
            if checkpointer is not None:
                checkpointer.wait_and_finish()
            if launcher == "slurm" and rank == 0:
                preemption.requeue(fabric.print)
            fabric.print(f"Stopped at step {step}; resume with --resume auto. {goodput.summary()}")
            return 0
    profile.step(progress.step)
    if val_data is not None and "validation" in final_missing:  # overlaps with the last checkpoint's write
        with goodput.phase("validation"):
            log.validation(progress, validate(fabric, model, val_data, cfg))
    if tasks and not cfg.eval_submit_slurm and "tasks" in final_missing:
        with goodput.phase("evaluation"):
            log.task_scores(progress, *tasks.run(model))
    if checkpointer is not None:
        with goodput.phase("checkpoint"):
            checkpointer.wait_and_finish()
    if failure := fabric.broadcast(log.failure, src=0):
        return log.stop_records_lost(failure, progress.step, run)
    fabric.print(goodput.summary())
    return 0


def step_batches(train_data: PackedDataset, cfg: TrainConfig, rank: int, world_size: int, step: int,
                 rollbacks: Rollbacks):
    """This rank's (step, micro-batches) from training step `step` on, past the data that rollbacks skipped."""
    return iter(StepLoader(train_data, global_batch_size=cfg.global_batch_size, micro_batch_size=cfg.micro_batch_size,
                           rank=rank, world_size=world_size, start_step=step, num_workers=cfg.num_workers,
                           skips=rollbacks.skips))


def roll_back(fabric: Fabric, cfg: TrainConfig, config: Config, model, optimizer, train_data: PackedDataset,
              rollbacks: Rollbacks, spike: Spike, run: RunDir, log: RunLog, goodput: Goodput,
              checkpointer: AsyncCheckpointer | None) -> tuple[Progress, DatapointLogger] | None:
    """Go back to the newest good checkpoint before the spike and skip its data (lit_gpt.rollback); the run's
    progress and datapoint logger from there, or None after the error line when the run must stop (collective)."""
    if not rollbacks.enabled:  # only a run of non-finite steps is a spike then: it ends the run, as it always did
        log.stop_nonfinite(spike.nonfinite_in_a_row, run)
        return None
    if refusal := rollbacks.exhausted(spike):
        fabric.print(f"error: {refusal}", file=sys.stderr)
        return None
    with goodput.phase("rollback"):
        if checkpointer is not None:  # the checkpoint in flight (of a step before the spike) may be the one to take
            checkpointer.wait_and_finish()
        target = rollbacks.checkpoint_before(run.path, spike.step)
        if target is None and spike.nonfinite_in_a_row:  # the message of a run without rollback
            log.stop_nonfinite(spike.nonfinite_in_a_row, run)
            return None
        if target is None:
            fabric.print(f"error: {rollbacks.no_checkpoint(spike, cfg.save_interval)}", file=sys.stderr)
            return None
        before = (rollbacks.skips, rollbacks.count)
        steps, data_steps = rollbacks.skipped_steps(spike, checkpoint_step(target))
        _, progress = restore(fabric, cfg, config, model, optimizer, train_data, rollbacks, path=target)
        rollbacks.rolled_back(data_steps, before)
        rank, c = fabric.global_rank, progress.step
        # As a resume to step c would, but the records of the earlier rollbacks to c stay: they are this run's past.
        datapoints = DatapointLogger(run.path, rank=rank, world_size=fabric.world_size, dataset=train_data,
                                     resume_step=c, rolled_back=True)
        samples = samples_of_data_steps(train_data, data_steps, cfg.global_batch_size)
        if rank == 0:
            set_aside_checkpoints_after(run.path, c, fabric.print)
            set_aside_benchmarks_after(run.path, c, fabric.print)  # scores of the checkpoints just set aside
            datapoints.write_skipped(rollbacks.count, spike.step, c, steps, data_steps, samples)
        log.restart(progress, MetricsLog(run.path, resume_step=c, enabled=rank == 0, log=fabric.print,
                                         write_csv="csv" in cfg.loggers, keep=keeps_rollbacks_to(c)))
        log.event(rollback_record(spike, rollbacks.count, target, steps, data_steps, samples),
                  f"{spike.describe()}: rollback {rollbacks.count} of at most {cfg.max_rollbacks} to {target.name}; "
                  f"skipping the data of steps {int(steps[0]) + 1}-{spike.step} (data steps "
                  f"{int(data_steps[0])}-{int(data_steps[-1])}, {samples.size} samples)")
    goodput.lost_until(spike.step)
    return progress, datapoints


def main(argv: list[str] | None = None) -> int:
    cfg, config = CLI_ARGS if argv is None and CLI_ARGS is not None else cli(argv)
    out_dir = Path(cfg.out_dir)
    existed = out_dir.exists()
    try:
        accel, devices, nodes, launcher = preflight.resolve_world(cfg)
        preflight.check_inputs(cfg, config, devices * nodes)
        if cfg.dry_run:  # the remaining checks and the report; nothing is built or written
            return preflight.dry_run(cfg, config, accel, devices, nodes)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.set_float32_matmul_precision("high")
    if accel == "cuda":  # before the process group exists
        configure_nccl_flight_recorder()
    fabric = Fabric(accelerator=accel, devices=devices, num_nodes=nodes, precision=cfg.precision,
                    strategy=make_strategy(cfg.strategy, devices * nodes, nodes, cfg.sharding_strategy,
                                           timeout=timedelta(seconds=cfg.dist_timeout_s)))
    fabric.launch()
    closing: list = []  # loggers and the profiler window, closed however the run ends
    try:
        return train(fabric, cfg, config, launcher, closing)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        if not existed and fabric.global_rank == 0:
            remove_empty_dirs(out_dir)  # a failed start leaves no trace
        return 2
    except SaveError as e:  # e.g. a full disk: the earlier checkpoints are kept
        fabric.print(f"error: {e}", file=sys.stderr)  # every rank has the same message (rank 0's verdict)
        return 1
    finally:
        for item in closing:
            item.close()


if __name__ == "__main__":
    sys.exit(main())
