"""One data preparation, start to end: validation, the plan, the stages, the switch, the report, waiting on Slurm.

`scripts/prepare_data.py` parses its flags into `PrepareOptions` and calls `prepare`; everything else is here.
A run is planned once (OUTPUT/.staging/run.json); a re-run with the same inputs and settings resumes that plan, and
one whose dataset is complete (`finalize.is_complete`) does nothing.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from lit_gpt.checkpoint.publish import check_output_path
from lit_gpt.corpus import InputError, document_names, expand_inputs, plan_shards
from lit_gpt.data_pipeline import executor, switch
from lit_gpt.data_pipeline.finalize import finalize, is_complete, report
from lit_gpt.data_pipeline.plan import (
    FORMAT_VERSION,
    SPLITS,
    STAGING,
    Plan,
    buckets_for,
    load_plan,
    save_plan,
    shard_bytes_for,
)
from lit_gpt.data_pipeline.steps import failures
from lit_gpt.litpkds import token_dtype
from lit_gpt.tokenizer import Tokenizer, tokenizer_digests


@dataclass
class PrepareOptions:
    """The flags of scripts/prepare_data.py (see its --help for each one's meaning)."""

    output_dir: Path
    input: list[str] | None = None
    tokenizer: Path | None = None
    text_field: str = "text"
    id_field: str = "id"
    chunk_size: int = 2049 * 1024
    val_fraction: float = 0.001
    on_error: str = "stop"
    seed: int = 42
    txt_docs_per_line: bool = False
    bos: bool = True
    overwrite: bool = False
    dedup_paragraphs: bool = False
    dedup_min_chars: int = 50
    min_token_ratio: float | None = None
    max_token_ratio: float | None = None
    executor: str = "local"
    workers: int = 1
    tasks: int | None = None  # None: --workers
    shard_mb: float = 256.0
    slurm_args: str = ""
    slurm_logs: Path = field(default_factory=lambda: Path("."))
    slurm_wait: bool = False

    def __post_init__(self) -> None:
        self.output_dir = Path(self.output_dir)
        self.slurm_logs = Path(self.slurm_logs)
        self.tasks = self.tasks or self.workers

    @property
    def cleaning_on(self) -> bool:
        return self.dedup_paragraphs or self.min_token_ratio is not None or self.max_token_ratio is not None


def prepare(options: PrepareOptions) -> None:
    """Prepare the dataset (or submit its Slurm jobs); InputError for anything wrong with the flags or inputs."""
    if options.executor == "slurm":
        _submit_slurm(options)
    else:
        _run_local(options)


# ----------------------------------------------------------------------------------------------- settings
def settings_fingerprint(options: PrepareOptions, files: list[Path]) -> tuple[str, dict]:
    """A hash of everything the output depends on (inputs by path, size and mtime; tokenizer by content)."""
    stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    tok = tokenizer_digests(options.tokenizer)
    settings = {"format_version": FORMAT_VERSION, "inputs": stats, "tokenizer": tok,
                "text_field": options.text_field, "id_field": options.id_field, "chunk_size": options.chunk_size,
                "val_fraction": options.val_fraction, "seed": options.seed,
                "txt_docs_per_line": options.txt_docs_per_line, "bos": options.bos}
    if options.cleaning_on:  # (without cleaning: the fingerprint of earlier versions, whose output is the same)
        settings["cleaning"] = {"dedup": options.dedup_paragraphs, "min_chars": options.dedup_min_chars,
                                "ratio": [options.min_token_ratio, options.max_token_ratio]}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest(), tok


def validate(options: PrepareOptions, tokenizer: Tokenizer) -> None:
    if options.chunk_size < 1:
        raise InputError(f"--chunk_size {options.chunk_size}: must be positive")
    if not 0 <= options.val_fraction < 1:
        raise InputError(f"--val_fraction {options.val_fraction}: must be in [0, 1)")
    for flag in ("workers", "tasks"):
        if getattr(options, flag) < 1:
            raise InputError(f"--{flag} {getattr(options, flag)}: must be at least 1")
    if not options.shard_mb > 0 or not math.isfinite(options.shard_mb):
        raise InputError(f"--shard_mb {options.shard_mb}: must be a positive number")
    if options.dedup_min_chars < 0:
        raise InputError(f"--dedup_min_chars {options.dedup_min_chars}: must not be negative")
    for flag in ("min_token_ratio", "max_token_ratio"):
        if getattr(options, flag) is not None and not getattr(options, flag) >= 0:
            raise InputError(f"--{flag} {getattr(options, flag)}: must be a number >= 0")
    low, high = options.min_token_ratio, options.max_token_ratio
    if None not in (low, high) and low > high:
        raise InputError(f"--min_token_ratio {low}: above --max_token_ratio {high}")
    check_output_path(options.output_dir, "--output_dir")
    if options.output_dir.exists() and not options.output_dir.is_dir():
        raise InputError(f"--output_dir {options.output_dir}: exists and is not a directory")
    if tokenizer.eos_id is None:
        raise InputError(f"--tokenizer {options.tokenizer}: has no EOS token to separate documents")
    if options.bos and tokenizer.bos_id is None:
        raise InputError(f"--tokenizer {options.tokenizer}: has no BOS token (pass --no-bos)")


def pad_id_for(tokenizer: Tokenizer) -> int:
    """The padding of the last chunk: the pad token, else <unk>; never a BOS/EOS separator."""
    # The last resort is the first id that is neither (0 is the separator in e.g. GPT-NeoX's tokenizer).
    for candidate in (tokenizer.pad_id, tokenizer.unk_id, 0, 1, 2):
        if candidate is not None and candidate not in (tokenizer.bos_id, tokenizer.eos_id):
            return candidate


# ----------------------------------------------------------------------------------------------- the plan
def _output_state(options: PrepareOptions, fingerprint: str) -> str:
    """'done' (nothing to do), 'resume' or 'fresh'; refuses to replace other data without --overwrite.

    Nothing in place is touched here: a fresh run only clears the staging area (an abandoned run of ours)."""
    out = options.output_dir
    switch.recover(out)  # a switch that a kill interrupted is finished first
    if is_complete(out, fingerprint):
        return "done"
    plan = load_plan(out / STAGING)
    if plan is not None and plan.fingerprint == fingerprint:
        return "resume"
    existing = [p for name in (*SPLITS, switch.CURRENT) for p in (out / name).glob("*")] if out.exists() else []
    if existing and not options.overwrite:
        raise InputError(f"--output_dir {out}: holds data prepared from other inputs or settings "
                         f"(pass --overwrite to replace it once the new data is complete, or choose another directory)")
    shutil.rmtree(out / STAGING, ignore_errors=True)
    return "fresh"


def _new_plan(options: PrepareOptions, files: list[Path], fingerprint: str, tok_hashes: dict,
              tokenizer: Tokenizer) -> Plan:
    total = sum(p.stat().st_size for p in files)
    shards = plan_shards(files, shard_bytes_for(total, options.tasks, options.shard_mb), options.txt_docs_per_line)
    return Plan(
        fingerprint=fingerprint, run_id=uuid.uuid4().hex[:12], files=[str(p) for p in files],
        names=document_names(files), inputs=[{"path": str(p), "bytes": p.stat().st_size} for p in files],
        shards=shards, text_field=options.text_field, id_field=options.id_field, on_error=options.on_error,
        tokenizer=str(options.tokenizer), tokenizer_backend=tokenizer.backend, tokenizer_files_sha256=tok_hashes,
        tokenizer_encoder=tokenizer.encoder,
        vocab_size=tokenizer.vocab_size, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, bos=options.bos,
        dtype=token_dtype(tokenizer.vocab_size).name, pad_id=pad_id_for(tokenizer), chunk_size=options.chunk_size,
        seed=options.seed, val_fraction=options.val_fraction, dedup=options.dedup_paragraphs,
        dedup_min_chars=options.dedup_min_chars, min_token_ratio=options.min_token_ratio,
        max_token_ratio=options.max_token_ratio, buckets=buckets_for(len(shards), options.tasks))


def plan_run(options: PrepareOptions) -> Plan | None:
    """Validate, then the plan of this run (saved in OUTPUT/.staging), or None when the output is already done."""
    if not options.input or options.tokenizer is None:
        raise InputError("--input and --tokenizer are required")
    try:
        tokenizer = Tokenizer(options.tokenizer)
    except ValueError as e:
        raise InputError(f"--tokenizer {options.tokenizer}: {e}") from None
    validate(options, tokenizer)
    files = expand_inputs(options.input)
    fingerprint, tok_hashes = settings_fingerprint(options, files)
    state = _output_state(options, fingerprint)
    if state == "done":
        print(f"{options.output_dir}: already prepared from these inputs and settings; nothing to do")
        return None
    work = options.output_dir / STAGING
    if state == "resume":
        print(f"resuming an interrupted run in {work}")
        plan = load_plan(work)
        # --on_error may change between tries (it changes no finished shard): a stop is retried under the new one.
        plan.on_error = options.on_error
        save_plan(work, plan)
        shutil.rmtree(work / "failed", ignore_errors=True)
        return plan
    plan = _new_plan(options, files, fingerprint, tok_hashes, tokenizer)
    save_plan(work, plan)
    return plan


# ----------------------------------------------------------------------------------------------- running
def _run_local(options: PrepareOptions) -> None:
    start = time.perf_counter()
    plan = plan_run(options)
    if plan is None:
        return
    work = options.output_dir / STAGING
    executor.run_local(work, plan, options.tasks, options.workers)
    total = finalize(options.output_dir, work, plan, options.tasks)
    report(plan, total)
    tokens = sum(t for t, _ in total["layout"].values())
    elapsed = max(time.perf_counter() - start, 1e-9)
    print(f"{options.output_dir}: done; {tokens / elapsed:,.0f} tokens/s with {options.workers} worker(s)")


def _submit_slurm(options: PrepareOptions) -> None:
    """Plan here, then submit the stages' Slurm jobs; with --slurm_wait, wait for them and check the result."""
    plan = plan_run(options)
    if plan is None:
        return
    options.slurm_logs.mkdir(parents=True, exist_ok=True)
    jobs = executor.submit_slurm(options.output_dir, plan, options.tasks, options.slurm_args, options.slurm_logs)
    log = executor.finalize_log(options.slurm_logs, jobs["finalize"])
    print(f"submitted; the summary will be in {log}")
    if options.slurm_wait:
        _wait_for(options, plan, jobs, log)


def _wait_for(options: PrepareOptions, plan: Plan, jobs: dict, log: Path) -> None:
    if not executor.wait_for_slurm(plan, str(jobs["finalize"])):
        failed = failures(options.output_dir / STAGING)
        if failed:
            raise InputError(executor.record_error_message(failed[0]))
        raise InputError(f"--executor slurm: a job failed and the later ones were cancelled; see the logs in "
                         f"{options.slurm_logs.resolve()}")
    if log.is_file():
        print(log.read_text(encoding="utf-8", errors="replace")[-4000:])
    if not is_complete(options.output_dir, plan.fingerprint):
        raise InputError(f"--executor slurm: the jobs ended without a complete dataset; see the logs in "
                         f"{options.slurm_logs.resolve()}")
