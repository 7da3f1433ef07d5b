"""The run plan: settings, shards and task counts of one preparation, stored in OUTPUT/.staging/run.json.

Every task reads the plan from there, so the Slurm array tasks of a run and a resumed local run agree on it.
"""
from __future__ import annotations

import json
import zlib
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from lit_gpt.checkpoint.publish import write_atomically
from lit_gpt.corpus import Shard
from lit_gpt.sample_order import splitmix64

SPLITS = ("train", "val")
STAGING = ".staging"
PLAN_FILE = "run.json"
FORMAT_VERSION = 1
MIN_SHARD_BYTES = 64 << 10


@dataclass
class Plan:
    """Everything a task needs to know about the run; the output is a function of it and the inputs alone."""

    fingerprint: str  # sha256 of the inputs (path, size, mtime), tokenizer files and output-relevant settings
    run_id: str  # new for every fresh plan: names the run's Slurm logging folders
    files: list[str]  # the input files, in corpus order
    names: list[str]  # each file's name in document ids (`name:line` when a record has no id)
    inputs: list[dict]  # {"path", "bytes"} per input, for the manifest
    shards: list[Shard]
    text_field: str
    id_field: str
    on_error: str  # "stop" or "skip"; may change between tries of one run
    tokenizer: str
    tokenizer_backend: str
    tokenizer_encoder: str  # the library that encodes ("sentencepiece" for a proven tokenizer.json directory)
    tokenizer_files_sha256: dict[str, str]
    vocab_size: int
    bos_id: int | None
    eos_id: int
    bos: bool  # BOS at document start
    dtype: str  # numpy name of the token dtype
    pad_id: int  # the tail of the last chunk
    chunk_size: int
    seed: int  # salt of the train/val hash
    val_fraction: float
    dedup: bool  # remove repeated paragraphs
    dedup_min_chars: int
    min_token_ratio: float | None
    max_token_ratio: float | None
    buckets: int  # dedup key buckets

    @property
    def stages(self) -> list[str]:
        return (["hash", "repeats"] if self.dedup else []) + ["tokenize", "pack"]

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Plan:
        unknown = data.keys() - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown plan fields {sorted(unknown)}")
        return cls(**{**data, "shards": [Shard(**s) for s in data["shards"]]})

    def shards_of_task(self, rank: int, tasks: int) -> list[Shard]:
        return [s for s in self.shards if s.index % tasks == rank]


def shard_bytes_for(total_bytes: int, tasks: int, shard_mb: float) -> int:
    """--shard_mb, but small enough that every task gets about four shards (balance on small inputs)."""
    return int(max(MIN_SHARD_BYTES, min(shard_mb * 2**20, -(-total_bytes // (4 * tasks)))))


def buckets_for(shards: int, tasks: int) -> int:
    """Dedup key buckets: one per shard (at least one per task), so that a repeats task holds about as many
    paragraph records as a hash task does for one shard: memory follows --shard_mb, never the input size."""
    return max(tasks, shards)


def save_plan(work: Path, plan: Plan) -> None:
    write_atomically(Path(work) / PLAN_FILE, json.dumps(plan.to_json(), indent=1).encode("utf-8"))


def load_plan(work: Path) -> Plan | None:
    """The saved plan; None when there is none or it is unreadable (an older version's: planned afresh)."""
    try:
        return Plan.from_json(json.loads((Path(work) / PLAN_FILE).read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError, KeyError):
        return None


def validation_mask(ids, seed: int, val_fraction: float) -> np.ndarray:
    """True for documents of the validation split: a function of (seed, id) only.

    hash = splitmix64(crc32(id) XOR splitmix64(seed)); validation when hash < val_fraction * 2**64. (CRC32 alone is
    linear; the splitmix64 finalizer makes the result uniform. Cheaper than a cryptographic hash per document.)"""
    crc = np.fromiter(map(zlib.crc32, map(str.encode, ids)), np.uint64, len(ids))
    hashes = splitmix64(crc ^ splitmix64(np.array([seed % 2**64], np.uint64))[0])
    return hashes < np.uint64(min(int(val_fraction * 2.0**64), 2**64 - 1))
