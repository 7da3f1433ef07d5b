"""The trainer's pre-flight checks: where it runs (`resolve_world`), whether its inputs can work (`check_inputs`: one
InputError naming the flag, before anything is built), and `--dry_run`: how big the run is, whether it fits and how
long it takes.

`dry_run` is called by pretrain/tinyllama_fabric.py after `check_inputs`: it opens the datasets as training would (manifests, chunk
sizes, document indexes), resolves the attention backend, verifies the checkpoint a resume would start from, and
prints parameters, tokens, the memory per GPU (lit_gpt.memory_estimate), the largest micro batch that fits
`--gpu_memory_gb` and the wall time at `--assumed_mfu`. Nothing is built on a device and nothing is written.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lit_gpt.attention import resolve_backend
from lit_gpt.checkpoint.publish import check_output_path
from lit_gpt.config import Config
from lit_gpt.errors import InputError
from lit_gpt.memory_estimate import GiB, MemoryEstimate, TrainingSetup, estimate_memory, largest_micro_batch
from lit_gpt.model import GPT, num_parameters
from lit_gpt.packed_dataset import PackedDataset
from lit_gpt.resume import check_out_dir, resume_checkpoint
from lit_gpt.run_dir import RunDir, checkpoint_step
from lit_gpt.speed_monitor import PEAK_BF16_FLOPS, device_peak_flops, flops_per_token, matmul_parameters
from lit_gpt.tokenizer import Tokenizer, tokenizer_digests

if TYPE_CHECKING:
    from pretrain.tinyllama_fabric import TrainConfig

# The wall time is given for this GPU when the dry run cannot see the one the run will use (e.g. on a login node).
REFERENCE_GPU = "H100"
MICRO_BATCH_LIMIT = 4096  # searched up to this


def resolve_world(cfg: TrainConfig) -> tuple[str, int, int, str]:
    """(accelerator, devices per node, nodes, launcher): from Slurm's environment when srun started us."""
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
    if cfg.num_nodes > 1 and not _launched_on_every_node():
        # Without one, this process would wait for ranks on other nodes that nothing starts.
        raise InputError(f"--num_nodes {cfg.num_nodes}: a multi-node run needs a launcher that starts it on every "
                         f"node: srun (Slurm) or torchrun (or NODE_RANK and MASTER_ADDR set on each node)")
    if cfg.devices != "auto":
        devices = int(cfg.devices)
    elif accel == "cuda":
        devices = torch.cuda.device_count()
    else:
        devices = 1
    return accel, devices, cfg.num_nodes, "local"


def _launched_on_every_node() -> bool:
    """Whether a launcher's environment says which node this is: torchrun's, or Lightning's manual one."""
    from lightning.fabric.plugins.environments import TorchElasticEnvironment

    return TorchElasticEnvironment.detect() or {"NODE_RANK", "MASTER_ADDR"} <= set(os.environ)


def check_one_sample(data: PackedDataset, flag: str) -> None:
    """Every source must hold one whole sample: a larger --block_size trains on a single padded window again and
    again (and builds tensors as large as that window)."""
    for source in data.sources:
        if source.tokens < data.sample_tokens:
            raise InputError(f"--block_size {data.block_size}: {source.directory} holds {source.tokens:,} tokens, "
                             f"fewer than one sample ({data.sample_tokens:,}) of --{flag}")


def check_inputs(cfg: TrainConfig, config: Config, world_size: int) -> None:
    """Fail fast, with one message naming the flag, on every file or world-size error detectable before training."""
    G, b = cfg.global_batch_size, cfg.micro_batch_size
    if G % world_size:
        raise InputError(f"--global_batch_size {G} must be a multiple of the number of devices ({world_size})")
    if (G // world_size) % b:
        raise InputError(f"--micro_batch_size {b} does not divide the per-device batch "
                         f"(--global_batch_size {G} / {world_size} devices = {G // world_size})")
    if cfg.tokenizer_path:
        try:
            vocab = Tokenizer(cfg.tokenizer_path).vocab_size
        except Exception as e:  # whatever the tokenizer libraries raise for a directory they cannot read
            raise InputError(f"--tokenizer_path {cfg.tokenizer_path}: cannot load tokenizer ({e})") from None
        if vocab > config.vocab_size:
            raise InputError(f"--tokenizer_path {cfg.tokenizer_path}: tokenizer has {vocab} tokens, more than the "
                             f"model's vocab_size {config.vocab_size} ({cfg.model_name}); pick a larger model or "
                             f"--vocab_size")
        _check_data_tokenizer(cfg)
    out = Path(cfg.out_dir)
    check_output_path(out, "--out_dir")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out_dir {out}: exists and is not a directory")
    probe_dir = next(p for p in (out, *out.parents) if p.exists())  # creating out_dir waits for a good start
    if not os.access(probe_dir, os.W_OK | os.X_OK):
        raise InputError(f"--out_dir {out}: not writable ({probe_dir} does not allow it)")
    for record in (RunDir(out).metrics_jsonl, RunDir(out).metrics_csv):  # appended to throughout the run
        if record.is_file() and not os.access(record, os.W_OK):
            raise InputError(f"--out_dir {out}: {record} is not writable")
    check_out_dir(out, cfg.resume)
    if cfg.init_from and not Path(cfg.init_from).exists():
        raise InputError(f"--init_from {cfg.init_from}: no such checkpoint")


def _check_data_tokenizer(cfg: TrainConfig) -> None:
    """Data prepared with another tokenizer than --tokenizer_path trains on ids that mean other tokens: compare the
    tokenizer files each split's manifest recorded (prepare_data.py) with those of --tokenizer_path."""
    ours = tokenizer_digests(Path(cfg.tokenizer_path))
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


def dry_run(cfg: TrainConfig, config: Config, accelerator: str, devices: int, nodes: int) -> int:
    """Run the remaining pre-flight checks (raising InputError naming the flag) and print the report on rank 0.
    Returns the exit code: 1 when the run does not fit --gpu_memory_gb, so that scripts can gate on it."""
    samples_per_epoch = _check_data(cfg, config)
    device = torch.device(accelerator)
    dtype = torch.float32 if cfg.precision == "32-true" else torch.bfloat16
    try:
        attn_impl = resolve_backend(config.attn_impl, device, dtype, config.head_size,
                                    document_masking=cfg.document_masking, needs_grad=True)
    except InputError as e:  # an explicitly requested backend that cannot run here
        raise InputError(f"--attn_impl: {e}") from None
    start_step = _resume_step(cfg)
    W = devices * nodes
    setup = TrainingSetup(config, cfg.micro_batch_size, cfg.global_batch_size // (W * cfg.micro_batch_size),
                          cfg.precision, cfg.strategy, cfg.sharding_strategy, W, devices,
                          cfg.activation_checkpointing, attn_impl, cfg.document_masking, device.type)
    first = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0  # under srun every task runs this
    if first:
        print(report(cfg, setup, samples_per_epoch, start_step), flush=True)
    needed = estimate_memory(setup).total
    if needed <= cfg.gpu_memory_gb * GiB:
        return 0
    if first:
        print(f"error: the run needs {_size(needed)} per {'GPU' if device.type == 'cuda' else 'process'}, more than "
              f"--gpu_memory_gb {cfg.gpu_memory_gb:g}", file=sys.stderr)
    return 1


def _check_data(cfg: TrainConfig, config: Config) -> int:
    """Open the training and validation data as train() does; the training samples per epoch."""
    checks = [("train_data_dir", cfg.train_sources, cfg.train_weights)]
    if cfg.val_data_dir:
        checks.append(("val_data_dir", [cfg.val_data_dir], None))
    samples = []
    for flag, sources, source_weights in checks:
        try:
            data = PackedDataset(sources, source_weights, block_size=config.block_size, seed=cfg.seed,
                                 with_doc_ids=cfg.document_masking, vocab_size=config.vocab_size)
        except InputError as e:  # names the file
            raise InputError(f"--{flag}: {e}") from None
        check_one_sample(data, flag)
        samples.append(data.samples_per_epoch)
    return samples[0]


def _resume_step(cfg: TrainConfig) -> int:
    """The step a resume would start from, after verifying its checkpoint as the run would (0 for a fresh run)."""
    path = resume_checkpoint(cfg.resume, cfg.out_dir, allow_unverified=cfg.allow_unverified)
    if path is None:
        return 0
    try:
        return checkpoint_step(path)
    except ValueError:  # another name: its step is known only once loaded
        return 0


def report(cfg: TrainConfig, setup: TrainingSetup, samples_per_epoch: int, start_step: int) -> str:
    config, W = setup.config, setup.world_size
    nodes = W // setup.devices_per_node
    with torch.device("meta"):
        n_params = num_parameters(GPT(config))
    G, T, b = cfg.global_batch_size, config.block_size, setup.micro_batch_size
    steps = max(0, cfg.max_steps - start_step)  # a finished run resumed has nothing left
    tokens = steps * G * T
    lines = [
        "Dry run: the pre-flight checks passed (flags, data, tokenizer, attention backend, checkpoints, out_dir); "
        "nothing was trained or written.",
        "",
        _row("model", f"{cfg.model_name}: {n_params:,} parameters ({matmul_parameters(config, n_params):,} in "
                      f"matmuls), {config.n_layer} layers x {config.n_embd}, {config.n_head} heads "
                      f"({config.n_query_groups} key/value), vocab {config.padded_vocab_size:,}"),
        _row("batch", f"{G} samples x {T} tokens = {G * T:,} tokens per step; {_count(W, 'rank')} "
                      f"({_count(nodes, 'node')} x {setup.devices_per_node}) x "
                      f"{_count(setup.micro_batches, 'micro-batch')} of {b}"),
        _row("schedule", f"{steps:,} steps" + (f" (from step {start_step:,} of {cfg.max_steps:,})" if start_step
                                                 else "") + f" = {tokens:,} tokens = "
                         f"{steps * G / samples_per_epoch:,.2f} epochs of the training data "
                         f"({samples_per_epoch:,} samples)"),
        _row("setup", f"{cfg.strategy}" + (f" {cfg.sharding_strategy}" if setup.sharded else "")
                      + f", {cfg.precision}, attention {setup.attn_impl}, activation checkpointing "
                      + ("on" if setup.activation_checkpointing else "off")
                      + (", compiled Blocks (saving less than estimated)" if cfg.compile else "")),
        "",
        *memory_table(estimate_memory(setup), cfg.gpu_memory_gb),
        "",
        *_micro_batch_lines(setup, cfg.gpu_memory_gb * GiB, G // W),
        _row("wall time", _wall_time(setup, n_params, tokens, cfg.assumed_mfu)),
    ]
    return "\n".join(lines)


def _row(name: str, text: str) -> str:
    return f"{name:<22}{text}"


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "es" if noun.endswith("h") else "s")


def _size(n_bytes: float) -> str:
    return f"{n_bytes / GiB:.2f} GiB" if n_bytes >= GiB else f"{n_bytes / 2**20:.1f} MiB"


def memory_table(estimate: MemoryEstimate, budget_gib: float) -> list[str]:
    s = estimate.setup
    where = "per GPU" if s.device_type == "cuda" else "per process (CPU: no CUDA overhead)"
    allocated = "= allocated" + (" (what torch.cuda.max_memory_allocated counts)" if s.device_type == "cuda" else "")
    rows = [*((name + _component_note(name, s), value) for name, value in estimate.components.items()),
            (allocated, estimate.allocated), *(("+ " + name, value) for name, value in estimate.overhead.items()),
            ("= total", estimate.total)]
    fits = estimate.total <= budget_gib * GiB
    verdict = f"fits ({estimate.total / (budget_gib * GiB):.0%})" if fits else "DOES NOT FIT"
    return [f"memory {where}, at its peak ({estimate.phase}):",
            *(f"  {label:<56}{_size(value):>12}" for label, value in rows),
            f"  {'of --gpu_memory_gb':<56}{_size(budget_gib * GiB):>12}   {verdict}"]


def _component_note(name: str, s: TrainingSetup) -> str:
    """What decides each component's size, in a few words."""
    master = "bf16" if s.master_bytes == 2 else "fp32"
    share = f", 1/{s.shards}" if s.shards > 1 else ""
    compute = "fp32" if s.compute_bytes == 4 else "bf16"
    notes = {
        "parameters": f" ({master}{share})",
        "optimizer state": f" (AdamW, 2 x {master}{share})",
        "gradients": f" ({master}{share})",
        "unsharded gradients": " (held between micro-batches)",
        "compute copies": (f" ({compute}, gathered by FSDP)" if s.sharded else " (bf16, autocast's weight casts)"),
        "activations": f" (micro batch {s.micro_batch_size}"
                       + (", Block inputs only)" if s.activation_checkpointing else ")"),
        "logits and loss": f" ({compute} logits, loss gradient)",
    }
    return notes.get(name, "")


def _micro_batch_lines(setup: TrainingSetup, budget: float, per_rank: int) -> list[str]:
    largest = largest_micro_batch(setup, budget, limit=MICRO_BATCH_LIMIT)
    valid = largest_micro_batch(setup, budget, divides=per_rank)
    shown = f"{largest:,}" + (" or more" if largest == MICRO_BATCH_LIMIT else "")
    lines = [_row("largest micro batch", f"{shown} within {budget / GiB:g} GiB; {valid} of those that divide the "
                                         f"{per_rank} samples per rank")]
    if not setup.activation_checkpointing:
        with_ckpt = largest_micro_batch(replace(setup, activation_checkpointing=True), budget, divides=per_rank)
        lines.append(_row("", f"{with_ckpt} with --activation_checkpointing true"))
    return lines


def _wall_time(setup: TrainingSetup, n_params: int, tokens: int, mfu: float) -> str:
    flops = tokens * flops_per_token(setup.config, n_params)
    W = setup.world_size
    peak = device_peak_flops(torch.device("cuda")) if setup.device_type == "cuda" else None
    if peak is not None:
        return (f"{_duration(flops / (mfu * peak * W))} at {mfu:.0%} MFU on {W} x {torch.cuda.get_device_name()} "
                f"({peak / 1e12:.0f} TFLOP/s dense bf16 each)")
    reference = dict(PEAK_BF16_FLOPS)[REFERENCE_GPU]
    here = torch.cuda.get_device_name() if setup.device_type == "cuda" else setup.device_type
    return (f"n/a here (peak FLOP/s of {here} unknown); {_duration(flops / (mfu * reference * W))} at {mfu:.0%} MFU "
            f"on {W} x {REFERENCE_GPU} SXM ({reference / 1e12:.0f} TFLOP/s dense bf16 each)")


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"

