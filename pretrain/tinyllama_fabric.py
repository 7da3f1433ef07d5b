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

import argparse
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_type_hints

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, DefaultHelpFormatter
from jsonargparse.typing import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, restricted_number_type

# Only pure-Python imports at module level: --help, --print_config and flag errors answer before torch and Lightning
# are imported (5-15 s on a busy node), so each function imports what it needs of them.
from lit_gpt.atomic_write import set_aside, write_atomically
from lit_gpt.config import AttnImpl, Config
from lit_gpt.errors import InputError
from lit_gpt.loggers import RunLoggers
from lit_gpt.metrics_log import MetricsLog, read_metrics
from lit_gpt.profiling import ProfileWindow, parse_window
from lit_gpt.tokenizer import Tokenizer, file_sha256, tokenizer_files

if TYPE_CHECKING:
    import torch
    from lightning.fabric import Fabric

    from lit_gpt.attention import DocumentMask
    from lit_gpt.datapoints import DatapointLogger
    from lit_gpt.packed_dataset import PackedDataset
    from lit_gpt.speed_monitor import SpeedMonitor

UnitIntervalOpenAbove = restricted_number_type("UnitIntervalOpenAbove", float, [(">=", 0), ("<", 1)])  # [0, 1)
UnitIntervalOpenBelow = restricted_number_type("UnitIntervalOpenBelow", float, [(">", 0), ("<=", 1)])  # (0, 1]
LOGGERS = ("tensorboard", "wandb", "csv")


def arg(default: Any, help: str) -> Any:
    """A hyperparameter: its default and its --help text (type, choices and bounds are the field's annotation)."""
    return field(default=default, metadata={"help": help})


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
    seed: int = arg(42, "seed of the initial weights and the sample order")
# ---------------------------------------------------------------------------------------------------------------

    def __post_init__(self) -> None:
        """What the annotations cannot say; the parser has checked types, choices and bounds."""
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise InputError(f"--{f.name} must be a finite number, got {value}")
        unknown = [name for name in self.loggers if name not in LOGGERS]
        if unknown:
            raise InputError(f"--logger: {', '.join(map(repr, unknown))} not among {', '.join(LOGGERS)}")
        try:
            parse_window(self.profile_steps)
        except ValueError as e:  # parse_window reads nothing else: its ValueError is about this flag
            raise InputError(f"--profile_steps: {e}") from None
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
    def loggers(self) -> list[str]:
        return self.logger.split(",")


# ------------------------------------------------- command line ------------------------------------------------
# lit_gpt.Config fields that override the named model; every size there is positive.
MODEL_FIELDS = {f.name: f for f in fields(Config) if "help" in f.metadata}
MODEL_TYPES = {"int": PositiveInt, "float": PositiveFloat}


class _HelpFormatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The module docstring as written; jsonargparse's type and default after each flag's help."""


def make_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=_HelpFormatter, exit_on_error=False,
                            print_config=None, usage="%(prog)s [--config YAML] [--print_config] [--NAME VALUE ...]")
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file of hyperparameters and model config "
                        "fields; the command line wins")
    parser.add_argument("--print_config", action="store_true", help="print the settings that differ from the "
                        "defaults (and the model fields that differ from --model_name's) as YAML for --config, and "
                        "exit")
    types = get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        kind = types[f.name]
        # Booleans work as bare switches (--compile) and with a value (--compile false), on the command line and in
        # YAML alike.
        options = dict(nargs="?", const=True) if kind is bool else {}
        parser.add_argument(f"--{f.name}", type=kind, default=f.default, help=f.metadata["help"],
                            metavar=_metavar(kind), **options)
    group = parser.add_argument_group("model config overrides (lit_gpt.Config fields; default: as --model_name)")
    for name, f in MODEL_FIELDS.items():
        kind = MODEL_TYPES[str(f.type).removesuffix(" | None")]
        group.add_argument(f"--{name}", type=kind, default=None, help=f.metadata["help"],
                           metavar=str(f.type).removesuffix(" | None").upper())
    return parser


def _metavar(kind: Any) -> str | None:
    if getattr(kind, "__origin__", None) is Literal:
        return None  # argparse shows the choices
    base = next((t for t in (bool, int, float, str) if isinstance(kind, type) and issubclass(kind, t)), None)
    return {bool: "[BOOL]", None: None}.get(base, base.__name__.upper() if base else None)


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, dict[str, Any], bool]:
    """(hyperparameters, model overrides, --print_config): defaults < YAML file(s) < command line, typed and
    checked. A bad value raises one InputError naming the flag (and the file it came from)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = make_parser()
    try:
        namespace = parser.parse_args(argv)
    except argparse.ArgumentError as e:
        raise InputError(_one_line(e, argv)) from None
    # jsonargparse's bounded types are int/float subclasses: plain values pickle into checkpoints and dump as YAML.
    values = {key: _plain(value) for key, value in namespace.as_dict().items()}
    cfg = TrainConfig(**{f.name: values[f.name] for f in fields(TrainConfig)})
    overrides = {name: values[name] for name in MODEL_FIELDS if values[name] is not None}
    return cfg, overrides, values["print_config"]


def _one_line(error: argparse.ArgumentError, argv: list[str]) -> str:
    """jsonargparse's message as one line naming the flag (and the YAML file when the value came from one), its type
    and bound failures said as what the value must be."""
    text = " ".join(str(error).split())
    message = text
    if match := re.match(r'Parser key "(\w+)": (.*)', text):
        key, detail = match.groups()
        bounds = [" and ".join(f"{op} {bound}" for op, bound in re.findall(r"v([<>]=?)([-+\w.]+)", restriction))
                  for restriction in re.findall(r"restriction (v[<>]=?[-+\w.]+(?: and v[<>]=?[-+\w.]+)*)", detail)]
        words = dict.fromkeys(word for choices in re.findall(r"Literal\[([^\]]*)\]", detail)
                              for word in choices.split(", "))
        value = re.search(r"(?:Given value|Got value): (.*?)(?: Given value type.*)?$", detail) or \
            re.search(r": (\S+) does not conform", detail)
        allowed = ([f"one of {', '.join(words)}"] if words else []) + bounds
        if allowed and value:
            message = f"--{key} must be {' or '.join(allowed)}, got {value.group(1)}"
        else:
            message = f"--{key}: {detail}"
    given = {arg.split("=")[0] for arg in argv if arg.startswith("--")}
    configs = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--config"]
    configs += [arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")]
    key = match.group(1) if match else None
    if configs and (key is None or f"--{key}" not in given) and not text.startswith("unrecognized arguments"):
        message = f"--config {', '.join(configs)}: {message.removeprefix('--')}"  # the file's key, not the flag
    return message


def _plain(value: Any) -> Any:
    for kind in (bool, int, float, str):
        if isinstance(value, kind):
            return kind(value)
    return value


def settings_yaml(cfg: TrainConfig, overrides: dict[str, Any]) -> str:
    """The YAML for --config: the hyperparameters that differ from their defaults and the model fields that differ
    from --model_name's, nothing derived (out_dir from model_name, max_steps from max_tokens)."""
    defaults = TrainConfig()
    named = Config.from_name(cfg.model_name).to_dict()
    values = {f.name: getattr(cfg, f.name) for f in fields(cfg) if getattr(cfg, f.name) != getattr(defaults, f.name)}
    values.update({name: value for name, value in overrides.items() if value != named[name]})
    return yaml.safe_dump(values, sort_keys=False, default_flow_style=False, allow_unicode=True) if values else ""


def check_config(cfg: TrainConfig, overrides: dict[str, Any]) -> Config:
    """Checks that need more than one flag (each flag alone was checked when parsed); the model config."""
    try:
        config = Config.from_name(cfg.model_name, attn_impl=cfg.attn_impl, **overrides)
    except ValueError as e:  # Config's own checks of the fields it was given
        blamed = " ".join(f"--{k} {v}" for k, v in overrides.items())
        raise InputError(f"model config ({blamed}): {e}" if overrides else f"--model_name: {e}") from None
    max_steps = math.ceil(cfg.max_tokens / (cfg.global_batch_size * config.block_size)) if cfg.max_tokens else \
        cfg.max_steps
    if max_steps < 1:
        raise InputError(f"--max_steps must be >= 1 (or set --max_tokens), got {max_steps}")
    if cfg.min_lr > cfg.learning_rate:  # the "decay" would rise
        raise InputError(f"--min_lr {cfg.min_lr} is above --learning_rate {cfg.learning_rate}")
    return config


def resolve_derived(cfg: TrainConfig, config: Config) -> None:
    """Settings that follow from others when left at their defaults: out_dir from model_name, max_steps from
    max_tokens."""
    cfg.out_dir = cfg.out_dir or f"out/{cfg.model_name}"
    if cfg.max_tokens:
        cfg.max_steps = math.ceil(cfg.max_tokens / (cfg.global_batch_size * config.block_size))


@contextmanager
def naming_flag(flag: str) -> Iterator[None]:
    """An InputError raised inside (it names the file) also names the flag that pointed there; any other error is a
    bug and propagates as it is."""
    try:
        yield
    except InputError as e:
        raise InputError(f"--{flag}: {e}") from None


def _check_data_dir(flag: str, path: str) -> None:
    p = Path(path)
    if not p.is_dir():
        raise InputError(f"--{flag} {path}: directory does not exist")
    if not any(p.glob("*.bin")):
        raise InputError(f"--{flag} {path}: contains no .bin chunk files (run scripts/prepare_data.py first)")


def check_data_paths(cfg: TrainConfig) -> None:
    """The data directories exist and hold chunks: checked before anything slow (torch, the tokenizer)."""
    for source in cfg.train_sources:
        _check_data_dir("train_data_dir", source)
    if cfg.val_data_dir:
        _check_data_dir("val_data_dir", cfg.val_data_dir)


def cli(argv: list[str] | None) -> tuple[TrainConfig, Config]:
    """The checked hyperparameters and model config; exits (code 2) on a bad flag, (0) after --print_config."""
    try:
        cfg, overrides, print_config = parse_args(argv)
        config = check_config(cfg, overrides)
        if print_config:
            print(settings_yaml(cfg, overrides), end="")
            sys.exit(0)
        resolve_derived(cfg, config)
        check_data_paths(cfg)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    return cfg, config


# ------------------------------------------------- validation --------------------------------------------------
def resolve_world(cfg: TrainConfig) -> tuple[str, int, int, str]:
    """(accelerator, devices per node, nodes, launcher): from Slurm's environment when srun started us."""
    import torch
    from lightning.fabric.plugins.environments import SLURMEnvironment

    accel = cfg.accelerator
    if accel == "auto":
        accel = "cuda" if torch.cuda.is_available() else "cpu"
    if accel == "cuda" and not torch.cuda.is_available():
        raise InputError("--accelerator cuda: no CUDA device is visible (torch.cuda.is_available() is False)")
    if SLURMEnvironment.detect() and "SLURM_NTASKS_PER_NODE" in os.environ:
        # Fabric takes ranks from Slurm; devices and nodes must agree with the allocation.
        per_node = int(os.environ["SLURM_NTASKS_PER_NODE"].split("(")[0])
        return accel, per_node, int(os.environ["SLURM_NNODES"]), "slurm"
    if cfg.devices != "auto":
        devices = int(cfg.devices)  # checked when parsed: "auto" or an integer >= 1
    elif accel == "cuda":
        devices = torch.cuda.device_count()
    else:
        devices = 1
    return accel, devices, cfg.num_nodes, "local"


def check_data_tokenizer(cfg: TrainConfig) -> None:
    """Data prepared with another tokenizer than --tokenizer_path trains on ids that mean other tokens: compare the
    tokenizer files each split's manifest recorded (prepare_data.py) with those of --tokenizer_path."""
    ours = {path.name: file_sha256(path) for path in tokenizer_files(Path(cfg.tokenizer_path))}
    for flag in ("train_data_dir", "val_data_dir"):
        for directory in filter(None, getattr(cfg, flag).split(",")):
            manifest = Path(directory) / "manifest.json"
            try:
                recorded = json.loads(manifest.read_text(encoding="utf-8"))["tokenizer"]["files_sha256"]
            except (OSError, ValueError, KeyError, TypeError):
                continue  # no manifest (TinyLlama's folders) or an older one: the token-id check at read time remains
            differing = sorted(name for name in set(recorded) | set(ours) if recorded.get(name) != ours.get(name))
            if differing:
                raise InputError(f"--{flag} {directory}: prepared with another tokenizer than --tokenizer_path "
                                 f"{cfg.tokenizer_path} (they differ in {', '.join(differing)}); prepare the data "
                                 f"with this tokenizer, or pass the one the data was made with")


def check_inputs(cfg: TrainConfig, config: Config, world_size: int) -> None:
    """Fail fast, with one message naming the flag, on every file or world-size error detectable before training."""
    from lit_gpt.checkpoints import latest_checkpoint

    G, b = cfg.global_batch_size, cfg.micro_batch_size
    if G % world_size:
        raise InputError(f"--global_batch_size {G} must be a multiple of the number of devices ({world_size})")
    if (G // world_size) % b:
        raise InputError(
            f"--micro_batch_size {b} does not divide the per-device batch "
            f"(--global_batch_size {G} / {world_size} devices = {G // world_size})"
        )
    if cfg.tokenizer_path:
        try:
            vocab = Tokenizer(cfg.tokenizer_path).vocab_size
        except Exception as e:
            raise InputError(f"--tokenizer_path {cfg.tokenizer_path}: cannot load tokenizer ({e})") from None
        if vocab > config.vocab_size:
            raise InputError(
                f"--tokenizer_path {cfg.tokenizer_path}: tokenizer has {vocab} tokens, more than the model's "
                f"vocab_size {config.vocab_size} ({cfg.model_name}); pick a larger model or --vocab_size"
            )
        check_data_tokenizer(cfg)
    out = Path(cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out_dir {out}: exists and is not a directory")
    probe_dir = next(p for p in (out, *out.parents) if p.exists())  # creating out_dir waits for a good start
    if not os.access(probe_dir, os.W_OK | os.X_OK):
        raise InputError(f"--out_dir {out}: not writable ({probe_dir} does not allow it)")
    if cfg.resume and cfg.resume != "auto" and not Path(cfg.resume).exists():
        raise InputError(f"--resume {cfg.resume}: no such checkpoint")
    if not cfg.resume and (newest := latest_checkpoint(out, verify=False)) is not None:
        # A fresh run here would mix its checkpoints with the old run's, and rotation would delete the new ones.
        raise InputError(f"--out_dir {out}: holds checkpoints of an earlier run (newest: {newest.name}); pass "
                         f"--resume auto to continue it, or choose another --out_dir")
    if cfg.init_from and not Path(cfg.init_from).exists():
        raise InputError(f"--init_from {cfg.init_from}: no such checkpoint")


def resume_checkpoint(cfg: TrainConfig, verify: bool = True) -> Path | None:
    """The checkpoint this run resumes from, if any. `verify` (collective): `auto` takes the newest that verifies, a
    named one must verify."""
    from lit_gpt.checkpoints import latest_checkpoint, verify_checkpoint

    if cfg.resume == "auto":
        return latest_checkpoint(Path(cfg.out_dir), verify=verify)
    path = Path(cfg.resume) if cfg.resume else None
    if path is not None and verify:
        verify_checkpoint(path)  # a damaged checkpoint raises an InputError naming the file
    return path


def check_resumable(ckpt: dict, path: Path, cfg: TrainConfig, train_data: PackedDataset) -> tuple[int, int, int, int]:
    """(step, micro-iterations, tokens seen, skipped steps) of a loaded checkpoint, after checking that this run can
    continue it; nothing in out_dir has changed yet, so a refusal leaves the run as it was."""
    missing = [key for key in ("step_count", "iter_num", "tokens_seen", "world_size", "rng", "data") if key not in ckpt]
    if missing:
        raise InputError(f"--resume {path}: not a checkpoint of this trainer (no {', '.join(missing)}); to start from "
                         f"its weights with a fresh optimizer use --init_from")
    data = ckpt["data"]
    if data["global_batch_size"] != cfg.global_batch_size:
        raise InputError(f"--global_batch_size {cfg.global_batch_size} differs from the checkpoint's "
                         f"{data['global_batch_size']}: the sample position would not map to a step")
    logged, now = data["manifest"]["fingerprint"], train_data.manifest["fingerprint"]
    if logged != now:
        raise InputError(f"--train_data_dir {cfg.train_data_dir}: {path} was trained on other data or with other "
                         f"order settings (data fingerprint {logged[:12]}, now {now[:12]}); resuming would mix two "
                         f"sample orders")
    step = ckpt["step_count"]
    if 0 < cfg.stop_at_step <= step < cfg.max_steps:
        # `step == stop_at_step` would never hold again: the run would silently train on to max_steps.
        raise InputError(f"--stop_at_step {cfg.stop_at_step}: the checkpoint is already at step {step}; "
                         f"pass a later --stop_at_step, or 0 to train to the end")
    return step, ckpt["iter_num"], ckpt["tokens_seen"], ckpt.get("skipped_steps", 0)


def resume_original(ckpt: dict, path: Path, cfg: TrainConfig, config: Config, fabric: Fabric) -> tuple[int, int, int, int]:
    """Counters for a run continued from the original TinyLlama/LLäMmlein trainer's checkpoint (weights and AdamW
    state are loaded). It holds no data position: the run goes on at its step count on this toolkit's sample order."""
    step, theirs = ckpt["step_count"], ckpt["hparams"].get("global_batch_size")
    if theirs is not None and theirs != cfg.global_batch_size:
        raise InputError(f"--global_batch_size {cfg.global_batch_size} differs from the original run's {theirs} "
                         f"({path}): its step count would mean another number of samples")
    if 0 < cfg.stop_at_step <= step < cfg.max_steps:
        raise InputError(f"--stop_at_step {cfg.stop_at_step}: the checkpoint is already at step {step}")
    fabric.print(f"{path} was written by the original TinyLlama/LLäMmlein trainer: its weights, AdamW state and step "
                 f"count ({step}) carry over; its data order cannot, so training continues at step {step} of this "
                 f"toolkit's order over --train_data_dir (sample position {step * cfg.global_batch_size:,}).")
    return step, ckpt["iter_num"], step * cfg.global_batch_size * config.block_size, 0


def set_aside_checkpoints_after(out_dir: Path, step: int, log) -> None:
    """Rename the checkpoints later than the resumed `step` to `*.abandoned` (kept, never deleted).

    They belong to the continuation this run replaces (its metrics and datapoint logs are dropped too); left in
    place, the next `--resume auto` (e.g. after a pre-emption) would pick the newest of them over this run's own."""
    from lit_gpt.checkpoints import checkpoint_step, list_checkpoints

    for later in list_checkpoints(out_dir):
        if checkpoint_step(later) > step:
            aside = set_aside(later, "abandoned")
            log(f"Set aside {later.name} (after the resumed step {step}) as {aside.name}")


# ------------------------------------------------- schedule & optimizer ----------------------------------------
def get_lr(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine or warmup-stable-decay."""
    lr, min_lr, warmup, total = cfg.learning_rate, cfg.min_lr, cfg.warmup_steps, cfg.max_steps
    if step < warmup:
        return lr * (step + 1) / warmup
    if cfg.lr_schedule == "wsd":
        decay_steps = max(1, int(cfg.decay_fraction * total))
        decay_start = total - decay_steps
        if step < decay_start:
            return lr
        return lr + (min_lr - lr) * min(1.0, (step - decay_start + 1) / decay_steps)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # Decided by name, not shape: FSDP1 flattens parameters, so ndim says nothing there.
    import torch

    decay, no_decay = [], []
    for name, param in model.named_parameters():
        is_norm = "norm" in name or "ln_f" in name or name.endswith(".bias")
        is_embedding = "wte" in name and not cfg.decay_embeddings
        (no_decay if is_norm or is_embedding else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # Fused (CUDA and CPU; on CPU 3.5x faster than the per-tensor loop): the training loop relies on its `found_inf`
    # input to skip non-finite steps on the device.
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps,
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


def capture_rng() -> dict:
    import torch

    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def write_run_files(out_dir: Path, cfg: TrainConfig, config: Config, extra: dict) -> None:
    """Beside the checkpoints: resolved hyperparameters, model config and the tokenizer (what an export needs)."""
    write_atomically(out_dir / "hparams.json", json.dumps({**asdict(cfg), **extra}, indent=2).encode())
    write_atomically(out_dir / "model_config.json", json.dumps(config.to_dict(), indent=2).encode())
    src = Path(cfg.tokenizer_path) if cfg.tokenizer_path else None
    if src is not None and src.exists():
        dst = out_dir / "tokenizer"
        dst.mkdir(exist_ok=True)
        files = [src] if src.is_file() else [p for p in src.iterdir() if p.is_file()]
        for f in files:
            write_atomically(dst / ("tokenizer.model" if f.suffix == ".model" else f.name), f.read_bytes())


# ------------------------------------------------- evaluation --------------------------------------------------
def validate(fabric: Fabric, model, val_data: PackedDataset, cfg: TrainConfig) -> float:
    """Token-weighted mean validation loss over all ranks, on the first eval_iters batches of global_batch_size
    samples of the validation order: the same samples whatever the world size (fewer when the split is smaller)."""
    import torch

    from lit_gpt.loss import token_losses
    from lit_gpt.packed_dataset import StepLoader

    with torch.no_grad():
        model.eval()
        W, G = fabric.world_size, cfg.global_batch_size
        iters = min(cfg.eval_iters, max(1, val_data.samples_per_epoch // G))
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


def _to(x, fabric: Fabric):
    # The loader pins batches when CUDA is in use: the copy overlaps with compute instead of synchronising.
    return x.to(fabric.device, non_blocking=True)


def _doc_mask(mb: dict, cfg: TrainConfig, fabric: Fabric) -> DocumentMask | None:
    return _to(mb["doc_mask"], fabric) if cfg.document_masking else None


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


def load_data(fabric: Fabric, cfg: TrainConfig, config: Config) -> tuple[PackedDataset, PackedDataset | None]:
    from lit_gpt.packed_dataset import PackedDataset

    cache = dict(cache_dir=cfg.cache_dir or None, cache_max_bytes=int(cfg.cache_max_gb * 2**30) or None)
    common = dict(block_size=config.block_size, seed=cfg.seed, with_doc_ids=cfg.document_masking,
                  vocab_size=config.vocab_size)
    # Data errors (a source too small for one sample, no document index for masking, a damaged chunk) are
    # InputErrors naming the file; the flag is added here.
    with naming_flag("train_data_dir"):
        train_data = PackedDataset(cfg.train_sources, cfg.train_weights, **common, **cache)
        if cfg.verify_data:
            fabric.print(f"Verified the checksums of {train_data.verify_checksums()} training chunks")
    val_data = None
    if cfg.val_data_dir:
        with naming_flag("val_data_dir"):
            val_data = PackedDataset([cfg.val_data_dir], None, **common)
            if cfg.verify_data:
                fabric.print(f"Verified the checksums of {val_data.verify_checksums()} validation chunks")
    return train_data, val_data


def build_model(fabric: Fabric, cfg: TrainConfig, config: Config):
    """(model, optimizer, parameter count), set up for the strategy; weights from --init_from if given."""
    import torch

    from lit_gpt.attention import resolve_backend
    from lit_gpt.checkpoint_io import load_checkpoint as load_weights
    from lit_gpt.model import GPT, num_parameters

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


def restore(fabric: Fabric, cfg: TrainConfig, config: Config, model, optimizer,
            train_data: PackedDataset) -> tuple[Path | None, Progress]:
    """Load the checkpoint to resume from (if any) into model and optimizer, check that this run can continue it and
    restore the RNG states. Changes nothing in out_dir."""
    import torch
    from torch.distributed.checkpoint import CheckpointException

    from lit_gpt.checkpoints import load_checkpoint

    path = resume_checkpoint(cfg)
    if path is None:
        return None, Progress()
    try:
        ckpt = load_checkpoint(path, model, optimizer)
    except (Exception, CheckpointException) as e:  # the same on every rank: all of them stop with this message
        raise InputError(f"--resume {path}: cannot be loaded into {cfg.model_name} with this optimizer "
                         f"({type(e).__name__}: {str(e).strip()[:500]}); a converted model without optimizer "
                         f"state starts with --init_from") from None
    if ckpt.get("original"):
        progress = Progress(*resume_original(ckpt, path, cfg, config, fabric))
    else:
        progress = Progress(*check_resumable(ckpt, path, cfg, train_data))
    if ckpt.get("world_size") == fabric.world_size:
        restore_rng(ckpt["rng"][fabric.global_rank])
    else:  # elastic resume: per-rank streams cannot carry over; derive fresh ones deterministically
        torch.manual_seed(cfg.seed + 1000003 * progress.step + fabric.global_rank)
    fabric.print(f"Resumed from {path} at step {progress.step} (written by {ckpt.get('world_size', '?')} ranks, "
                 f"now {fabric.world_size})")
    return path, progress


def train_step(fabric: Fabric, model, optimizer, micro_batches: list[dict], data_error: Exception | None,
               cfg: TrainConfig, stop_signal: bool) -> StepResult:
    """One optimizer step over this rank's micro-batches of the global batch."""
    import torch

    from lit_gpt.loss import token_losses

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
            logits = model(_to(mb["input_ids"], fabric), doc_mask=_doc_mask(mb, cfg, fabric))
            ce, objective = token_losses(logits, _to(mb["labels"], fabric), cfg.z_loss)
            del logits  # the loss keeps only its gradient: the logits can go before backward
            fabric.backward(objective * (W / global_real))
        loss_sum += ce
    grad_norm = fabric.clip_gradients(model, optimizer, max_norm=cfg.grad_clip or float("inf"),
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


def save(fabric: Fabric, cfg: TrainConfig, config: Config, model, optimizer, progress: Progress,
         train_data: PackedDataset, datapoints: DatapointLogger) -> None:
    import torch

    from lit_gpt.checkpoints import checkpoint_path, save_checkpoint

    datapoints.flush(progress.step)
    rng = [None] * fabric.world_size
    if fabric.world_size > 1:
        torch.distributed.all_gather_object(rng, capture_rng())
    else:
        rng = [capture_rng()]
    G = cfg.global_batch_size
    meta = {"step_count": progress.step, "iter_num": progress.iter_num, "tokens_seen": progress.tokens_seen,
            "skipped_steps": progress.skipped, "world_size": fabric.world_size, "rng": rng, "hparams": asdict(cfg),
            "config": config.to_dict(),
            "data": {"global_batch_size": G, "samples_seen": progress.step * G, "manifest": train_data.manifest}}
    path = checkpoint_path(Path(cfg.out_dir), progress.step)
    save_checkpoint(path, model, optimizer, meta, cfg.state_dict_type, keep_last=cfg.keep_last_checkpoints)
    fabric.print(f"Saved {path}")


class RunLog:
    """Everything a step reports: metrics.jsonl/.csv, TensorBoard/W&B, the console line, tokens/s and MFU."""

    def __init__(self, fabric: Fabric, cfg: TrainConfig, monitor: SpeedMonitor, metrics: MetricsLog,
                 loggers: RunLoggers, start: Progress) -> None:
        self.fabric, self.cfg, self.monitor, self.metrics, self.loggers = fabric, cfg, monitor, metrics, loggers
        self.start_time, self.start_step = time.perf_counter(), start.step
        monitor.update(start.tokens_seen)

    def step(self, progress: Progress, result: StepResult, lr: float) -> None:
        import torch

        cfg, fabric = self.cfg, self.fabric
        if not result.finite:
            fabric.print(f"step {progress.step}: update skipped: non-finite " + " and ".join(
                f"{name} ({value})" for name, value in (("loss", result.loss), ("gradient norm", result.grad_norm))
                if not math.isfinite(value)))
        if progress.step % cfg.log_interval and progress.step != cfg.max_steps:
            return
        self.monitor.update(progress.tokens_seen)
        elapsed = time.perf_counter() - self.start_time
        eta = elapsed / (progress.step - self.start_step) * (cfg.max_steps - progress.step)
        memory = (torch.cuda.max_memory_allocated() if fabric.device.type == "cuda" else _rss_bytes()) / 2**30
        tps, mfu = self.monitor.tokens_per_sec(), self.monitor.mfu()
        record = {"iter": progress.iter_num, "step": progress.step,
                  "loss": result.loss if math.isfinite(result.loss) else None, "lr": lr,
                  "grad_norm": result.grad_norm if math.isfinite(result.grad_norm) else None,
                  "tokens": progress.tokens_seen, "tokens_per_sec": tps, "mfu": mfu, "skipped_steps": progress.skipped,
                  "memory_gb": memory, "time": elapsed}
        self.metrics.write(record)
        self.loggers.log({k: v for k, v in record.items() if v is not None and k not in ("step", "time")},
                         progress.step)
        fabric.print(f"step {progress.step}/{cfg.max_steps} | loss {result.loss:.4f} | lr {lr:.2e} | "
                     f"grad {result.grad_norm:.3f}" + (f" | {tps:,.0f} tok/s" if tps else "")
                     + (f" | MFU {mfu:.1%}" if mfu else "") + f" | mem {memory:.1f} GiB | ETA {eta / 60:.1f} min")

    def validation(self, model, val_data: PackedDataset, progress: Progress) -> None:
        val_loss = validate(self.fabric, model, val_data, self.cfg)
        self.metrics.write({"iter": progress.iter_num, "step": progress.step, "val_loss": val_loss})
        self.loggers.log({"val_loss": val_loss}, progress.step)
        self.fabric.print(f"step {progress.step} | val loss {val_loss:.4f} | "
                          f"val ppl {math.exp(min(val_loss, 50)):.1f}")


def train(fabric: Fabric, cfg: TrainConfig, config: Config, launcher: str, closing: list) -> int:
    """The run, top to bottom; what must be closed however it ends (loggers, profiler) is appended to `closing`."""
    import torch

    from lit_gpt.checkpoints import latest_checkpoint
    from lit_gpt.datapoints import DatapointLogger
    from lit_gpt.packed_dataset import StepLoader
    from lit_gpt.speed_monitor import (
        MFU_CONVENTION,
        SpeedMonitor,
        device_peak_flops,
        flops_per_token,
        matmul_parameters,
    )

    out_dir = Path(cfg.out_dir)
    rank, W = fabric.global_rank, fabric.world_size
    fabric.seed_everything(cfg.seed)  # identical initial weights on every rank
    # Installed before the (possibly long) setup: a signal's default action would kill the job without a save.
    preemption = Preemption()
    train_data, val_data = load_data(fabric, cfg, config)
    model, optimizer, n_params = build_model(fabric, cfg, config)
    resume_path, progress = restore(fabric, cfg, config, model, optimizer, train_data)
    if progress.step >= cfg.max_steps:  # a finished run started again (e.g. a requeued job): nothing to add
        fabric.print(f"{resume_path} is at step {progress.step}, the run's last (--max_steps {cfg.max_steps}); "
                     f"nothing to train")
        return 0
    with naming_flag("out_dir"):  # an unreadable metrics.jsonl stops the run before anything changes
        existing_metrics = read_metrics(out_dir / "metrics.jsonl", fabric.print) if rank == 0 else None

    # Every check that can refuse this run is behind us (the datapoint log's, in its constructor, is the last): only
    # now does anything in out_dir change.
    resume_step = progress.step if resume_path is not None else None
    with naming_flag("train_data_dir"):  # the run was logged with other data
        datapoints = DatapointLogger(out_dir, rank=rank, world_size=W, dataset=train_data, resume_step=progress.step)
    if rank == 0:
        write_run_files(out_dir, cfg, config, {"world_size": W, "launched_by": launcher, "num_parameters": n_params})
        if resume_path is not None:
            set_aside_checkpoints_after(out_dir, progress.step, fabric.print)
    names = cfg.loggers
    metrics = MetricsLog(out_dir, resume_step=resume_step, enabled=rank == 0, log=fabric.print,
                         existing=existing_metrics, write_csv="csv" in names)
    loggers = RunLoggers(out_dir, names, resume_step, enabled=rank == 0, wandb_options=dict(
        project=cfg.wandb_project, name=cfg.wandb_name, entity=cfg.wandb_entity,
        tags=[t for t in cfg.wandb_tags.split(",") if t]))
    closing.append(loggers)
    loggers.log_hparams({**asdict(cfg), **config.to_dict()})
    peak = device_peak_flops(fabric.device)
    log = RunLog(fabric, cfg, SpeedMonitor(flops_per_token(config, n_params), W, peak), metrics, loggers, progress)
    fabric.print(f"{cfg.model_name}: {n_params / 1e6:.1f}M parameters | world_size={W} ({launcher}) | "
                 f"{cfg.global_batch_size} samples x {config.block_size} tokens per step | {cfg.max_steps} steps")
    if peak:
        fabric.print(f"MFU: {MFU_CONVENTION} ({matmul_parameters(config, n_params) / 1e6:.1f}M), over "
                     f"{peak / 1e12:.0f} TFLOP/s dense bf16 per {torch.cuda.get_device_name(fabric.device)}")
    profile = ProfileWindow(cfg.profile_steps, out_dir, rank, fabric.device)
    closing.append(profile)  # a run that stops inside the window keeps what was recorded

    if val_data is not None and progress.step == 0:
        log.validation(model, val_data, progress)  # the untrained baseline
    batches = iter(StepLoader(train_data, global_batch_size=cfg.global_batch_size,
                              micro_batch_size=cfg.micro_batch_size, rank=rank, world_size=W,
                              start_step=progress.step, num_workers=cfg.num_workers))
    nonfinite_in_a_row = 0
    while progress.step < cfg.max_steps:
        profile.step(progress.step)
        try:  # a damaged chunk (or one of another tokenizer) is found when a rank first reads it
            data_step, micro_batches = next(batches)
            data_error = None
        except InputError as e:  # names the file; anything else is a bug and propagates with its traceback
            data_step, micro_batches, data_error = progress.step, [], e
        assert data_step == progress.step, f"data loader at step {data_step}, trainer at {progress.step}"
        lr = get_lr(progress.step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        result = train_step(fabric, model, optimizer, micro_batches, data_error, cfg, preemption.requested)
        datapoints.record(progress.step, torch.cat([mb["sample_index"] for mb in micro_batches]))
        nonfinite_in_a_row = 0 if result.finite else nonfinite_in_a_row + 1
        progress = Progress(progress.step + 1, progress.iter_num + len(micro_batches),
                            progress.tokens_seen + result.tokens, progress.skipped + (not result.finite))
        log.step(progress, result, lr)
        if nonfinite_in_a_row >= cfg.max_nonfinite_steps:
            good = latest_checkpoint(out_dir)
            fabric.print(f"error: {nonfinite_in_a_row} consecutive non-finite steps; stopping. "
                         + (f"The last good checkpoint is {good}" if good else "No checkpoint was written before."),
                         file=sys.stderr)
            return 1
        step = progress.step
        if val_data is not None and cfg.eval_interval and step % cfg.eval_interval == 0 and step < cfg.max_steps:
            log.validation(model, val_data, progress)
        stop_now = result.stop_requested or step == cfg.stop_at_step
        if ((step % cfg.save_interval == 0 or step == cfg.max_steps) and not nonfinite_in_a_row) or stop_now:
            save(fabric, cfg, config, model, optimizer, progress, train_data, datapoints)
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
    cfg, config = cli(argv)  # before torch is imported: --help and flag errors answer at once
    import torch
    from lightning.fabric import Fabric

    from lit_gpt import preflight
    from lit_gpt.checkpoints import SaveError
    from lit_gpt.distributed import make_strategy

    out_dir = Path(cfg.out_dir)
    existed = out_dir.exists()
    try:
        accel, devices, nodes, launcher = resolve_world(cfg)
        check_inputs(cfg, config, devices * nodes)
        if cfg.dry_run:  # the remaining checks and the report; nothing is built or written
            return preflight.dry_run(cfg, config, accel, devices, nodes)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.set_float32_matmul_precision("high")
    fabric = Fabric(accelerator=accel, devices=devices, num_nodes=nodes, precision=cfg.precision,
                    strategy=make_strategy(cfg.strategy, devices * nodes, nodes, cfg.sharding_strategy))
    fabric.launch()
    closing: list = []  # loggers and the profiler window, closed however the run ends
    try:
        return train(fabric, cfg, config, launcher, closing)
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
