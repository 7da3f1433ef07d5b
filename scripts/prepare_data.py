"""Clean and tokenize a corpus into packed LITPKDS chunks with document indexes, split into train and validation.

    python scripts/prepare_data.py --input corpus/ --output_dir data --tokenizer tokenizer --workers 16
    python scripts/prepare_data.py ... --dedup_paragraphs --max_token_ratio 2.5 --executor slurm --tasks 256

Inputs: .txt (one document per file; one per non-empty line with --txt_docs_per_line), .jsonl, .jsonl.zst and
.parquet (records with a text field and an optional id field; without one the id is `file:line`). Inputs are cut
into shards (contiguous pieces of about --shard_mb, so one huge file is shared by many tasks and read in constant
memory); the stages of lit_gpt.data_pipeline run as datatrove tasks, on this machine (--executor local, --workers
at a time) or as Slurm array jobs (--executor slurm, see cluster/exec/prepare_data.sbatch).

Cleaning (optional, as LLäMmlein): --dedup_paragraphs removes every paragraph (line) whose normalized text occurred
earlier in the corpus, and drops documents left shorter than --dedup_min_chars; --min/max_token_ratio drop
documents outside those tokens-per-word bounds. A histogram of the ratios is always written (DIR/current/report.json
and the summary), so bounds can be chosen from a first run. Each document becomes [BOS] tokens EOS (BOS optional with
--no-bos), and documents are concatenated into chunks of --chunk_size tokens. A document goes to validation when the
hash of (seed, id) falls below --val_fraction, so the split is a function of the id alone. Output is identical
whatever the number of tasks and workers.

Output, per split (DIR/train, DIR/val):
  {split}_{counter:010d}.bin   TinyLlama LITPKDS chunks (readable by TinyLlama's PackedDataset and by ours)
  index/{split}_{counter:010d}.json   the chunk's real token count, document starts and document ids
  manifest.json                files, token counts, sha256 hashes, tokenizer, cleaning and settings
The last chunk keeps the full size of its header (TinyLlama readers index it like any other); only its first
`tokens` entries (see its index file and the manifest) are data, the rest is the pad id (the tokenizer's pad,
else <unk>), never BOS/EOS separators. Our reader stops at the real tokens.

DIR/train and DIR/val are symlinks into DIR/current, itself a symlink to DIR/versions/V: a finished run replaces the
dataset with one atomic rename of `current` (lit_gpt/data_pipeline/switch.py), and a run killed at any point
leaves the complete old or, on the next run, the complete new dataset. Work happens in DIR/.staging; a re-run with
the same inputs and settings continues where the last one stopped, and a finished one is skipped. Malformed
records are reported with file and line; --on_error skip counts and skips them.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from lit_gpt.corpus import InputError, document_names, expand_inputs, plan_shards
from lit_gpt.data_pipeline import executor, switch
from lit_gpt.data_pipeline.finalize import finalize, summary_table
from lit_gpt.data_pipeline.plan import (
    FORMAT_VERSION,
    SPLITS,
    STAGING,
    buckets_for,
    file_sha256,
    load_plan,
    plan_to_json,
    save_plan,
    shard_bytes_for,
    stages,
    tokenizer_files,
    validation_mask,
)
from lit_gpt.litpkds import token_dtype
from lit_gpt.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]

__all__ = ["main", "validation_mask", "pad_id_for", "STAGING"]
SBATCH_SCRIPT = ROOT / "cluster" / "exec" / "prepare_data.sbatch"
STAGES = ("hash", "repeats", "tokenize", "pack", "finalize")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", help="files or folders (.txt/.jsonl/.jsonl.zst/.parquet)")
    p.add_argument("--output_dir", type=Path, required=True)
    p.add_argument("--tokenizer", type=Path, help="tokenizer dir, .model or tokenizer.json")
    p.add_argument("--text_field", default="text")
    p.add_argument("--id_field", default="id")
    p.add_argument("--chunk_size", type=int, default=2049 * 1024, help="tokens per chunk file (TinyLlama's default)")
    p.add_argument("--val_fraction", type=float, default=0.001)
    p.add_argument("--on_error", default="stop", choices=["skip", "stop"], help="on malformed records")
    p.add_argument("--seed", type=int, default=42, help="salt of the train/val hash")
    p.add_argument("--txt_docs_per_line", action="store_true", help="each non-empty line of a .txt is a document")
    p.add_argument("--bos", action=argparse.BooleanOptionalAction, default=True, help="BOS at document start")
    p.add_argument("--overwrite", action="store_true", help="replace data prepared with other inputs or settings")
    cleaning = p.add_argument_group("cleaning")
    cleaning.add_argument("--dedup_paragraphs", action=argparse.BooleanOptionalAction, default=False,
                          help="remove paragraphs (lines) seen earlier in the corpus (case and spacing ignored)")
    cleaning.add_argument("--dedup_min_chars", type=int, default=50,
                          help="drop documents shorter than this after removing repeated paragraphs")
    cleaning.add_argument("--min_token_ratio", type=float, default=None, help="drop documents below these tokens/word")
    cleaning.add_argument("--max_token_ratio", type=float, default=None, help="drop documents above these tokens/word")
    run = p.add_argument_group("execution")
    run.add_argument("--executor", default="local", choices=["local", "slurm"],
                     help="local: tasks run here, --workers at a time; slurm: submit Slurm array jobs per stage")
    run.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="local: tasks running at once")
    run.add_argument("--tasks", type=int, default=None, help="tasks per stage (default: --workers)")
    run.add_argument("--shard_mb", type=float, default=256.0, help="input per shard, the unit of work and resume")
    run.add_argument("--slurm_args", default="",
                     help="slurm: extra sbatch options, e.g. '--partition=cpu --time=4:00:00'")
    run.add_argument("--slurm_logs", type=Path, default=Path("."), help="slurm: folder for the job logs")
    run.add_argument("--slurm_wait", action="store_true", help="slurm: wait for the last job and report its result")
    run.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)  # one Slurm task (the job script's call)
    run.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.tasks = args.tasks or args.workers
    return args


# ----------------------------------------------------------------------------------------------- settings
def cleaning_on(args: argparse.Namespace) -> bool:
    return args.dedup_paragraphs or args.min_token_ratio is not None or args.max_token_ratio is not None


def settings_fingerprint(args: argparse.Namespace, files: list[Path]) -> tuple[str, dict]:
    """A hash of everything the output depends on (inputs by path, size and mtime; tokenizer by content)."""
    stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    tok = {p.name: file_sha256(p) for p in tokenizer_files(args.tokenizer)}
    settings = {"format_version": FORMAT_VERSION, "inputs": stats, "tokenizer": tok, "text_field": args.text_field,
                "id_field": args.id_field, "chunk_size": args.chunk_size, "val_fraction": args.val_fraction,
                "seed": args.seed, "txt_docs_per_line": args.txt_docs_per_line, "bos": args.bos}
    if cleaning_on(args):  # (without cleaning: the fingerprint of earlier versions, whose output is the same)
        settings["cleaning"] = {"dedup": args.dedup_paragraphs, "min_chars": args.dedup_min_chars,
                                "ratio": [args.min_token_ratio, args.max_token_ratio]}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest(), tok


def validate(args: argparse.Namespace, tokenizer: Tokenizer) -> None:
    if args.chunk_size < 1:
        raise InputError(f"--chunk_size {args.chunk_size}: must be positive")
    if not 0 <= args.val_fraction < 1:
        raise InputError(f"--val_fraction {args.val_fraction}: must be in [0, 1)")
    for flag in ("workers", "tasks"):
        if getattr(args, flag) < 1:
            raise InputError(f"--{flag} {getattr(args, flag)}: must be at least 1")
    if args.shard_mb <= 0:
        raise InputError(f"--shard_mb {args.shard_mb}: must be positive")
    if args.dedup_min_chars < 0:
        raise InputError(f"--dedup_min_chars {args.dedup_min_chars}: must not be negative")
    for flag in ("min_token_ratio", "max_token_ratio"):
        if getattr(args, flag) is not None and not getattr(args, flag) >= 0:
            raise InputError(f"--{flag} {getattr(args, flag)}: must be a number >= 0")
    if None not in (args.min_token_ratio, args.max_token_ratio) and args.min_token_ratio > args.max_token_ratio:
        raise InputError(f"--min_token_ratio {args.min_token_ratio}: above --max_token_ratio {args.max_token_ratio}")
    if args.output_dir.exists() and not args.output_dir.is_dir():
        raise InputError(f"--output_dir {args.output_dir}: exists and is not a directory")
    if tokenizer.eos_id is None:
        raise InputError(f"--tokenizer {args.tokenizer}: has no EOS token to separate documents")
    if args.bos and tokenizer.bos_id is None:
        raise InputError(f"--tokenizer {args.tokenizer}: has no BOS token (pass --no-bos)")


def pad_id_for(tokenizer: Tokenizer) -> int:
    """The padding of the last chunk: the pad token, else <unk>; never a BOS/EOS separator."""
    # The last resort is the first id that is neither (0 is the separator in e.g. GPT-NeoX's tokenizer).
    for candidate in (tokenizer.pad_id, tokenizer.unk_id, 0, 1, 2):
        if candidate is not None and candidate not in (tokenizer.bos_id, tokenizer.eos_id):
            return candidate


# ----------------------------------------------------------------------------------------------- output state
def read_manifest(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_complete(out: Path, fingerprint: str) -> bool:
    """Both splits' manifests carry this fingerprint and every chunk they list is there, with its full size."""
    for split in SPLITS:
        manifest = read_manifest(out / split / "manifest.json")
        if manifest is None or manifest.get("fingerprint") != fingerprint:
            return False
        itemsize = 2 if manifest["dtype"] == "uint16" else 4
        for entry in manifest["files"]:
            chunk = out / split / entry["name"]
            if not chunk.is_file() or chunk.stat().st_size != 24 + itemsize * manifest["chunk_size"]:
                return False
    return True


def prepare_output(args: argparse.Namespace, fingerprint: str) -> str:
    """'done' (nothing to do), 'resume' or 'fresh'; refuses to replace other data without --overwrite.

    Nothing in place is touched here: a fresh run only clears the staging area (an abandoned run of ours)."""
    out = args.output_dir
    switch.recover(out)  # a switch that a kill interrupted is finished first
    if is_complete(out, fingerprint):
        return "done"
    plan = load_plan(out / STAGING)
    if plan is not None and plan["fingerprint"] == fingerprint:
        return "resume"
    existing = [p for name in (*SPLITS, switch.CURRENT) for p in (out / name).glob("*")] if out.exists() else []
    if existing and not args.overwrite:
        raise InputError(f"--output_dir {out}: holds data prepared from other inputs or settings "
                         f"(pass --overwrite to replace it once the new data is complete, or choose another directory)")
    shutil.rmtree(out / STAGING, ignore_errors=True)
    return "fresh"


def make_plan(args: argparse.Namespace, files: list[Path], fingerprint: str, tok_hashes: dict,
              tokenizer: Tokenizer) -> dict:
    total = sum(p.stat().st_size for p in files)
    shards = plan_shards(files, shard_bytes_for(total, args.tasks, args.shard_mb), args.txt_docs_per_line)
    return {
        "fingerprint": fingerprint, "files": [str(p) for p in files], "names": document_names(files),
        "inputs": [{"path": str(p), "bytes": p.stat().st_size} for p in files], "shards": shards,
        "text_field": args.text_field, "id_field": args.id_field, "on_error": args.on_error,
        "tokenizer": str(args.tokenizer), "tokenizer_backend": tokenizer.backend, "tokenizer_files_sha256": tok_hashes,
        "tokenizer_encoder": tokenizer.encoder,
        "vocab_size": tokenizer.vocab_size, "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id, "bos": args.bos,
        "dtype": token_dtype(tokenizer.vocab_size).name, "pad_id": pad_id_for(tokenizer),
        "chunk_size": args.chunk_size, "seed": args.seed, "val_fraction": args.val_fraction,
        "dedup": args.dedup_paragraphs, "dedup_min_chars": args.dedup_min_chars,
        "min_token_ratio": args.min_token_ratio, "max_token_ratio": args.max_token_ratio,
        "buckets": buckets_for(len(shards), args.tasks),
    }


def setup_run(args: argparse.Namespace) -> dict | None:
    """Validate, then the plan of this run (saved in DIR/.staging), or None when the output is already done."""
    if not args.input or args.tokenizer is None:
        raise InputError("--input and --tokenizer are required")
    try:
        tokenizer = Tokenizer(args.tokenizer)
    except ValueError as e:
        raise InputError(f"--tokenizer {args.tokenizer}: {e}") from None
    validate(args, tokenizer)
    files = expand_inputs(args.input)
    fingerprint, tok_hashes = settings_fingerprint(args, files)
    mode = prepare_output(args, fingerprint)
    if mode == "done":
        print(f"{args.output_dir}: already prepared from these inputs and settings; nothing to do")
        return None
    work = args.output_dir / STAGING
    if mode == "resume":
        print(f"resuming an interrupted run in {work}")
        plan = load_plan(work)
        # --on_error may change between tries (it changes no finished shard): a stop is retried under the new one.
        plan["on_error"] = args.on_error
        save_plan(work, plan_to_json(plan))
        shutil.rmtree(work / "failed", ignore_errors=True)
        return plan
    plan = make_plan(args, files, fingerprint, tok_hashes, tokenizer)
    save_plan(work, plan_to_json(plan))
    return plan


def report(args: argparse.Namespace, plan: dict, total: dict, elapsed: float | None = None) -> None:
    for message in total["messages"]:
        print(f"warning: skipped: {message}", file=sys.stderr)
    if total["skipped"] > len(total["messages"]):
        print(f"warning: {total['skipped'] - len(total['messages'])} further skipped records are only counted",
              file=sys.stderr)
    print(summary_table(plan, total))
    tokens = sum(t for t, _ in total["layout"].values())
    speed = f"; {tokens / max(elapsed, 1e-9):,.0f} tokens/s with {args.workers} worker(s)" if elapsed else ""
    print(f"{args.output_dir}: done{speed}")
    if not total["layout"]["val"][1] and plan["val_fraction"] > 0:
        print("warning: no document fell into the validation split", file=sys.stderr)


# ----------------------------------------------------------------------------------------------- executors
def run_local(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    plan = setup_run(args)
    if plan is None:
        return 0
    work = args.output_dir / STAGING
    for stage in stages(plan):
        executor.run_stage(work, stage, args.tasks, args.workers)
    total = finalize(args.output_dir, work, plan, args.tasks)
    report(args, plan, total, time.perf_counter() - start)
    return 0


def run_slurm_task(args: argparse.Namespace) -> int:
    """One task of a stage, inside a Slurm job (cluster/exec/prepare_data.sbatch)."""
    work = args.output_dir / STAGING
    plan = load_plan(work)
    if plan is None:
        raise InputError(f"--output_dir {args.output_dir}: no run planned there ({work / 'run.json'} missing)")
    if args.stage == "finalize":
        if is_complete(args.output_dir, plan["fingerprint"]):
            print(f"{args.output_dir}: already complete")
            return 0
        report(args, plan, finalize(args.output_dir, work, plan, args.tasks))
    else:
        executor.run_task(work, args.stage, args.tasks, args.rank)
    return 0


def submit_slurm(args: argparse.Namespace) -> int:
    """Plan here, then one Slurm array job per stage (unfinished tasks only), each after the one before."""
    if shutil.which("sbatch") is None:
        raise InputError("--executor slurm: sbatch is not on PATH (run this on a Slurm login node)")
    plan = setup_run(args)
    if plan is None:
        return 0
    work = args.output_dir / STAGING
    args.slurm_logs.mkdir(parents=True, exist_ok=True)
    common = ["--output_dir", str(args.output_dir.resolve()), "--tasks", str(args.tasks)]
    dependency, job = None, None
    for stage in [*stages(plan), "finalize"]:
        ranks = executor.incomplete(work, stage, args.tasks) if stage != "finalize" else [0]
        if not ranks:
            print(f"{stage}: all {args.tasks} tasks already complete")
            continue
        options = [f"--job-name=prepare-{stage}", f"--output={args.slurm_logs.resolve()}/prepare-{stage}-%A_%a.out",
                   f"--array={','.join(map(str, ranks))}", *shlex.split(args.slurm_args)]
        if dependency:
            options.append(f"--dependency=afterok:{dependency}")
        command = ["sbatch", "--parsable", *options, str(SBATCH_SCRIPT), *common, "--stage", stage]
        result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        if result.returncode != 0:
            raise InputError(f"--slurm_args: sbatch refused the {stage} job: {result.stderr.strip()}")
        dependency = job = result.stdout.strip().split(";")[0]
        print(f"{stage}: job {job} ({len(ranks)} task(s))")
    print(f"submitted; the summary will be in {args.slurm_logs.resolve()}/prepare-finalize-{job}_0.out")
    if args.slurm_wait:
        return wait_for(args, plan, job)
    return 0


def wait_for(args: argparse.Namespace, plan: dict, job: str) -> int:
    while subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip():
        time.sleep(2)
    log = args.slurm_logs.resolve() / f"prepare-finalize-{job}_0.out"
    if log.is_file():
        print(log.read_text(encoding="utf-8", errors="replace")[-4000:])
    if not is_complete(args.output_dir, plan["fingerprint"]):
        raise InputError(f"--executor slurm: the jobs ended without a complete dataset; see the logs in "
                         f"{args.slurm_logs.resolve()}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.stage:
            return run_slurm_task(args)
        return submit_slurm(args) if args.executor == "slurm" else run_local(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
