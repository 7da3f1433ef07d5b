"""Clean and tokenize a corpus into packed LITPKDS chunks with document indexes, split into train and validation.

    python scripts/prepare_data.py --input corpus/ --output_dir data --tokenizer tokenizer --workers 16
    python scripts/prepare_data.py ... --dedup_paragraphs --max_token_ratio 2.5 --executor slurm --tasks 256

Inputs: .txt (one document per file; one per non-empty line with --txt_docs_per_line), .jsonl, .jsonl.zst and
.parquet (records with a text field and an optional id field; without one the id is `file:line`). Inputs are cut
into shards (contiguous pieces of about --shard_mb, so one huge file is shared by many tasks and read in constant
memory); the stages of lit_gpt.data_pipeline run as datatrove tasks, on this machine (LocalPipelineExecutor,
--workers at a time) or as Slurm array jobs (SlurmPipelineExecutor, one per stage, each depending on the one before;
see cluster/exec/prepare_data_env.sh).

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
import os
import sys
from pathlib import Path

# Parsing imports nothing heavy (--help and a bad flag answer at once); lit_gpt's pipeline loads after it.


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
                     help="slurm: sbatch options in long form, e.g. '--partition=cpu --time=4:00:00 --mem-per-cpu=4G' "
                          "(defaults: the default partition, 4 hours, datatrove's 2G per CPU)")
    run.add_argument("--slurm_logs", type=Path, default=Path("."), help="slurm: folder for the job logs")
    run.add_argument("--slurm_wait", action="store_true", help="slurm: wait for the last job and report its result")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from lit_gpt.data_pipeline.executor import disk_full
    from lit_gpt.data_pipeline.prepare import PrepareOptions, prepare
    from lit_gpt.errors import InputError  # the base: the pipeline's own and those of the helpers it uses

    try:
        prepare(PrepareOptions(**vars(args)))
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        full = disk_full(e)
        if full is None:
            raise  # a bug: its traceback
        print(f"error: --output_dir {args.output_dir}: {full.strerror} (writing {full.filename or 'it'}); the data "
              f"in place is kept, and a re-run continues the work done", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
