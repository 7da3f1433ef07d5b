"""The datatrove pipeline steps of data preparation (see the package docstring for the stages and why they
exchange files rather than documents).

Each step works on whole shards (or key buckets, or chunk ranges) and writes its output under OUTPUT/.staging
atomically, a small "done" file last; a re-run skips finished pieces, so a task killed half-way loses only the
piece it was on. A malformed record under --on_error stop writes failed/SHARD.txt; every task stops at its next
piece and raises RecordError: datatrove marks no failed task complete, and the main process (or the Slurm job)
reports the first failure in corpus order as one line.
"""
from __future__ import annotations

import json
import time
from itertools import chain
from pathlib import Path

import numpy as np
from datatrove.pipeline.base import PipelineStep
from datatrove.utils.logging import logger

from lit_gpt import cleaning
from lit_gpt.checkpoint.publish import write_atomically
from lit_gpt.corpus import InputError, parse_unit, shard_units
from lit_gpt.data_pipeline import packing
from lit_gpt.data_pipeline.plan import SPLITS, Plan, load_plan, validation_mask

SHOWN_MESSAGES = 10
RECORD = np.dtype([("key", "<u8"), ("pos", "<u8")])  # a paragraph's key and corpus position


def part_meta_path(work: Path, shard: int) -> Path:
    return work / "parts" / f"{shard:06d}.json"


def read_json(path: Path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def failures(work: Path) -> list[str]:
    """Messages of failed shards, in corpus order."""
    return [p.read_text(encoding="utf-8") for p in sorted((Path(work) / "failed").glob("*.txt"))]


class RecordError(InputError):
    """A malformed record under --on_error stop (its message names the file and line)."""


class _ShardStep(PipelineStep):
    """A step whose task processes its share of pieces, each written atomically with a "done" file last."""

    type = "🦙 - PREPARE"

    def __init__(self, work: Path) -> None:
        super().__init__()
        self.work = str(work)

    def pieces(self, plan: Plan, rank: int, world_size: int) -> list:
        return plan.shards_of_task(rank, world_size)

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        work = Path(self.work)
        plan = load_plan(work)
        self.setup(plan)
        todo = [p for p in self.pieces(plan, rank, world_size) if not self.done(work, p)]
        logger.info(f"{self.name}: task {rank}/{world_size}: {len(todo)} piece(s) to do")
        for number, piece in enumerate(todo, 1):
            failed = failures(work)
            if failed:  # another task met a malformed record under --on_error stop
                raise RecordError(failed[0])
            self.process(work, plan, piece, f"{number}/{len(todo)}")
        # Every piece's output is a file of its own (the stages' data flows through files, not documents).
        yield from ()

    def setup(self, plan: Plan) -> None:
        pass

    def done(self, work: Path, piece) -> bool:
        raise NotImplementedError

    def process(self, work: Path, plan: Plan, piece, progress: str) -> None:
        """Do one piece (RecordError on a malformed record under --on_error stop)."""
        raise NotImplementedError


def _documents(plan: Plan, shard, work: Path, stats: dict):
    """(ids, texts) per unit of the shard; malformed records are counted (first messages kept) or, under
    --on_error stop, recorded as the shard's failure (failed/SHARD.txt) and raised."""
    files = [Path(f) for f in plan.files]
    for unit in shard_units(shard, files):
        ids, texts, errors = parse_unit(unit, files, plan.names, plan.text_field, plan.id_field)
        if errors:
            if plan.on_error == "stop":
                write_atomically(work / "failed" / f"{shard.index:06d}.txt", errors[0].encode("utf-8"))
                raise RecordError(errors[0])
            stats["skipped"] += len(errors)
            stats["messages"].extend(errors[:SHOWN_MESSAGES - len(stats["messages"])])
        stats["bytes"] += unit.size
        yield ids, texts


class HashParagraphs(_ShardStep):
    """Per shard: (key, position) of every non-blank paragraph, sorted by key bucket, with bucket offsets."""

    name = "hash paragraphs"

    def done(self, work, shard) -> bool:
        return (work / "hash" / f"{shard.index:06d}.offsets.npy").is_file()

    def process(self, work, plan, shard, progress) -> None:
        stats = {"skipped": 0, "messages": [], "bytes": 0}
        keys, ordinals, ordinal = [np.empty(0, np.uint64)], [np.empty(0, np.uint64)], 0
        for _, texts in _documents(plan, shard, work, stats):
            k, o, ordinal = cleaning.paragraph_hashes(texts, ordinal)
            keys.append(k)
            ordinals.append(o)
        keys = np.concatenate(keys)
        records = np.empty(len(keys), RECORD)
        records["key"] = keys
        records["pos"] = cleaning.shard_position(shard.index, np.concatenate(ordinals))
        bucket = records["key"] % np.uint64(plan.buckets)
        order = np.argsort(bucket, kind="stable")
        records, bucket = records[order], bucket[order]
        offsets = np.searchsorted(bucket, np.arange(plan.buckets + 1, dtype=np.uint64)).astype(np.int64)
        write_atomically(work / "hash" / f"{shard.index:06d}.records.bin", records.tobytes())
        _save_npy(work / "hash" / f"{shard.index:06d}.offsets.npy", offsets)  # last: marks the shard done
        self.stat_update("paragraphs", value=len(keys))
        logger.info(f"hash: shard {shard.index} ({progress}): {len(keys):,} paragraphs")


class FindRepeats(_ShardStep):
    """Per key bucket: the positions of every paragraph whose key occurred earlier in the corpus."""

    name = "find repeated paragraphs"

    def pieces(self, plan, rank, world_size) -> list:
        return list(range(rank, plan.buckets, world_size))

    def done(self, work, bucket) -> bool:
        return (work / "repeats" / f"{bucket:05d}.npy").is_file()

    def process(self, work, plan, bucket, progress) -> None:
        parts = []
        for shard in plan.shards:
            offsets = np.load(work / "hash" / f"{shard.index:06d}.offsets.npy")
            # Read just this bucket's records (a memory map would read ahead and hold far more of every file).
            start, count = int(offsets[bucket]), int(offsets[bucket + 1] - offsets[bucket])
            parts.append(np.fromfile(work / "hash" / f"{shard.index:06d}.records.bin", RECORD, count,
                                     offset=start * RECORD.itemsize))
        records = np.concatenate(parts) if parts else np.empty(0, RECORD)
        repeats = cleaning.first_occurrences_dropped(records["key"], records["pos"])
        _save_npy(work / "repeats" / f"{bucket:05d}.npy", repeats)
        logger.info(f"repeats: bucket {bucket} ({progress}): {len(repeats):,} of {len(records):,} paragraphs repeat")


class Tokenize(_ShardStep):
    """Per shard: cleaning, tokenization and the train/val split into parts/SHARD.{split}.bin + docs + meta."""

    name = "clean and tokenize"

    def setup(self, plan: Plan) -> None:
        from lit_gpt.tokenizer import Tokenizer

        self.tokenizer = Tokenizer(plan.tokenizer)
        self.dtype = np.dtype(plan.dtype)

    def done(self, work, shard) -> bool:
        return part_meta_path(work, shard.index).is_file()

    def _repeats(self, work: Path, plan: Plan, shard: int) -> np.ndarray:
        """Ordinals (within the shard, sorted) of the shard's repeated paragraphs."""
        if not plan.dedup:
            return np.empty(0, np.uint64)
        low = cleaning.shard_position(shard, 0)
        high = cleaning.shard_position(shard + 1, 0) if shard + 1 < 1 << (64 - cleaning.POSITION_BITS) else None
        found = []
        for bucket in range(plan.buckets):
            positions = np.load(work / "repeats" / f"{bucket:05d}.npy", mmap_mode="r")
            a = np.searchsorted(positions, low)
            b = np.searchsorted(positions, high) if high is not None else len(positions)
            found.append(np.asarray(positions[a:b]) - low)
        return np.sort(np.concatenate(found)) if found else np.empty(0, np.uint64)

    def process(self, work, plan, shard, progress) -> None:
        start = time.perf_counter()
        stats = {"skipped": 0, "messages": [], "bytes": 0, "documents_in": 0, "empty": 0,
                 "repeated_paragraphs": 0, "dropped_short": 0, "dropped_ratio_low": 0, "dropped_ratio_high": 0,
                 "histogram": np.zeros(len(cleaning.HISTOGRAM_EDGES), np.int64)}
        removed = self._repeats(work, plan, shard.index)
        writers = {split: packing.PartWriter(work, shard.index, split, self.dtype) for split in SPLITS}
        ordinal = 0
        for ids, texts in _documents(plan, shard, work, stats):
            stats["documents_in"] += len(texts)
            ids, texts, ordinal = self._clean(plan, ids, texts, removed, ordinal, stats)
            if texts:
                self._tokenize(plan, ids, texts, writers, stats)
        for writer in writers.values():
            writer.close()
        meta = {key: value for key, value in stats.items() if key != "histogram"}
        meta["histogram"] = stats["histogram"].tolist()
        meta.update({split: {"tokens": w.tokens, "documents": len(w.ids)} for split, w in writers.items()})
        write_atomically(part_meta_path(work, shard.index), json.dumps(meta).encode("utf-8"))
        elapsed = max(time.perf_counter() - start, 1e-9)
        tokens = sum(w.tokens for w in writers.values())
        kept = sum(len(w.ids) for w in writers.values())
        for label in ("documents_in", "empty", "skipped", "repeated_paragraphs", "dropped_short",
                      "dropped_ratio_low", "dropped_ratio_high"):
            self.stat_update(label, value=stats[label])
        self.stat_update("tokens", value=tokens)
        logger.info(f"tokenize: shard {shard.index} ({progress}): {kept:,} documents, {tokens:,} tokens in "
                    f"{elapsed:.1f} s ({kept / elapsed:,.0f} documents/s, {tokens / elapsed:,.0f} tokens/s); "
                    f"dropped: {stats['empty']} empty, {stats['skipped']} malformed, {stats['dropped_short']} too "
                    f"short after removing {stats['repeated_paragraphs']:,} repeated paragraphs, "
                    f"{stats['dropped_ratio_low']} below and {stats['dropped_ratio_high']} above the token ratio")

    @staticmethod
    def _clean(plan, ids, texts, removed, ordinal, stats):
        """Documents left after dropping empty ones and repeated paragraphs; and the next paragraph ordinal."""
        if not plan.dedup and all(texts):  # the common case without cleaning: nothing to drop
            return ids, texts, ordinal
        repeats = np.zeros(len(texts), np.uint64)
        if plan.dedup:
            texts, repeats, ordinal = cleaning.remove_paragraphs(texts, ordinal, removed)
            stats["repeated_paragraphs"] += int(repeats.sum())
        min_chars = max(1, plan.dedup_min_chars)
        kept_ids, kept_texts = [], []
        for doc_id, text, repeated in zip(ids, texts, repeats.tolist()):
            if repeated and len(text.strip()) < min_chars:
                stats["dropped_short"] += 1
            elif not text:
                stats["empty"] += 1
            else:
                kept_ids.append(doc_id)
                kept_texts.append(text)
        return kept_ids, kept_texts, ordinal

    def _tokenize(self, plan, ids, texts, writers, stats) -> None:
        encoded = self.tokenizer.encode_batch(texts, bos=plan.bos, eos=True)
        lengths = np.fromiter(map(len, encoded), np.int64, len(encoded))
        words = np.fromiter(map(len, map(str.split, texts)), np.int64, len(texts))
        content = lengths - (1 + bool(plan.bos))  # tokens of the text itself, without BOS/EOS
        stats["histogram"] += np.bincount(cleaning.ratio_bins(content, words), minlength=len(stats["histogram"]))
        keep = cleaning.ratio_keep(content, words, plan.min_token_ratio, plan.max_token_ratio)
        if not keep.all():
            low = plan.min_token_ratio
            too_low = ~keep & (content < low * words) if low is not None else np.zeros(len(keep), bool)
            stats["dropped_ratio_low"] += int(too_low.sum())
            stats["dropped_ratio_high"] += int((~keep).sum() - too_low.sum())
            encoded = [e for e, k in zip(encoded, keep) if k]
            ids = [i for i, k in zip(ids, keep) if k]
            lengths = lengths[keep]
        tokens = np.fromiter(chain.from_iterable(encoded), self.dtype, int(lengths.sum()))
        is_val = validation_mask(ids, plan.seed, plan.val_fraction)
        if not is_val.any():  # the common case: no copies
            writers["train"].add(tokens, lengths, ids)
            return
        token_is_val = np.repeat(is_val, lengths)
        for split, doc_mask, token_mask in (("train", ~is_val, ~token_is_val), ("val", is_val, token_is_val)):
            writers[split].add(tokens[token_mask], lengths[doc_mask], [i for i, m in zip(ids, doc_mask) if m])


class Pack(_ShardStep):
    """Per contiguous range of chunks: LITPKDS chunk files and document indexes from the parts."""

    name = "pack chunks"

    def pieces(self, plan, rank, world_size) -> list:
        return [(rank, world_size)]

    def done(self, work, piece) -> bool:
        return False  # the executor's completion marker skips a finished task; a killed one redoes its range

    def process(self, work, plan, piece, progress) -> None:
        rank, tasks = piece
        layout = packing.Layout(work, plan)
        jobs = layout.chunks()
        mine = jobs[rank * len(jobs) // tasks:(rank + 1) * len(jobs) // tasks]
        entries = [layout.write_chunk(split, c) for split, c in mine]
        write_atomically(packing.pack_result_path(work, tasks, rank), json.dumps(entries).encode("utf-8"))
        logger.info(f"pack: task {rank}: {len(mine)} chunk(s)")


def _save_npy(path: Path, array: np.ndarray) -> None:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    write_atomically(path, buffer.getvalue())


STEPS = {"hash": HashParagraphs, "repeats": FindRepeats, "tokenize": Tokenize, "pack": Pack}
