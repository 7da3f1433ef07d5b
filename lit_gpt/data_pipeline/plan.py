"""The run plan: settings, shards and task counts of one preparation, stored in OUTPUT/.staging/run.json.

Every task reads the plan from there, so the Slurm array tasks of a run and a resumed local run agree on it.
"""
from __future__ import annotations

import json
import zlib
from dataclasses import asdict
from pathlib import Path

import numpy as np

from lit_gpt.checkpoint.publish import write_atomically
from lit_gpt.corpus import Shard
from lit_gpt.sample_order import splitmix64
from lit_gpt.tokenizer import file_sha256, tokenizer_files  # noqa: F401  (re-exported for prepare_data)

SPLITS = ("train", "val")
STAGING = ".staging"
PLAN_FILE = "run.json"
FORMAT_VERSION = 1
MIN_SHARD_BYTES = 64 << 10


def stages(plan: dict) -> list[str]:
    return (["hash", "repeats"] if plan["dedup"] else []) + ["tokenize", "pack"]


def shard_bytes_for(total_bytes: int, tasks: int, shard_mb: float) -> int:
    """--shard_mb, but small enough that every task gets about four shards (balance on small inputs)."""
    return int(max(MIN_SHARD_BYTES, min(shard_mb * 2**20, -(-total_bytes // (4 * tasks)))))


def buckets_for(shards: int, tasks: int) -> int:
    """Dedup key buckets: one per shard (at least one per task), so that a repeats task holds about as many
    paragraph records as a hash task does for one shard: memory follows --shard_mb, never the input size."""
    return max(tasks, shards)


def save_plan(work: Path, plan: dict) -> None:
    write_atomically(work / PLAN_FILE, json.dumps(plan, indent=1).encode("utf-8"))


def load_plan(work: Path) -> dict | None:
    try:
        plan = json.loads((Path(work) / PLAN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    plan["shards"] = [Shard(**s) for s in plan["shards"]]
    return plan


def plan_to_json(plan: dict) -> dict:
    return {**plan, "shards": [asdict(s) for s in plan["shards"]]}


def validation_mask(ids, seed: int, val_fraction: float) -> np.ndarray:
    """True for documents of the validation split: a function of (seed, id) only.

    hash = splitmix64(crc32(id) XOR splitmix64(seed)); validation when hash < val_fraction * 2**64. (CRC32 alone is
    linear; the splitmix64 finalizer makes the result uniform. Cheaper than a cryptographic hash per document.)"""
    crc = np.fromiter(map(zlib.crc32, map(str.encode, ids)), np.uint64, len(ids))
    hashes = splitmix64(crc ^ splitmix64(np.array([seed % 2**64], np.uint64))[0])
    return hashes < np.uint64(min(int(val_fraction * 2.0**64), 2**64 - 1))


def shards_of_task(plan: dict, rank: int, tasks: int) -> list[Shard]:
    return [s for s in plan["shards"] if s.index % tasks == rank]
