"""Datapoint logs: which samples (and so which documents) every optimizer step trained on.

Layout under the run's output directory:
  datapoints/dataset.json     the training dataset's manifest (sources, fingerprints, order parameters)
  datapoints/steps-FIRST-LAST-rankR-ofW.npz   one file per rank and flush: `steps` [n] and `samples` [n, G/W],
                              the global sample ids rank R of W trained on in those steps, in micro-batch order
Each rank buffers `record(step, sample_index)` in memory; `flush(upto_step)` writes the buffered steps < upto_step
atomically right before the checkpoint of upto_step is saved, so a checkpoint's log never lists steps it does
not contain. A run resumed at step k (on any world size) first drops logged steps >= k. The documents of a
sample follow from the dataset (its chunk indexes), pinned by the fingerprint in dataset.json; `DatapointLog`
answers the questions `scripts/datapoints.py` asks.
"""
from __future__ import annotations

import io
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lit_gpt.checkpoint.publish import set_aside, write_atomically
from lit_gpt.errors import InputError
from lit_gpt.packed_dataset import PackedDataset
from lit_gpt.run_dir import RunDir

DATASET_FILE = "dataset.json"
_SEGMENT = re.compile(r"^steps-(\d{8})-(\d{8})-rank(\d{5})-of(\d{5})\.npz$")


def _segment_name(first: int, last: int, rank: int, world_size: int) -> str:
    return f"steps-{first:08d}-{last:08d}-rank{rank:05d}-of{world_size:05d}.npz"


def _write_npz(path: Path, **arrays) -> None:
    blob = io.BytesIO()
    np.savez(blob, **arrays)
    write_atomically(path, blob.getvalue())


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: unreadable datapoint log segment ({e})") from None


class DatapointLogger:
    def __init__(self, out_dir, rank: int, world_size: int, dataset: PackedDataset, resume_step: int = 0) -> None:
        self.dir = RunDir(out_dir).datapoints
        self.rank, self.world_size = rank, world_size
        self.dtype = np.uint32 if dataset.samples_per_epoch < 2**32 else np.int64
        self._steps: list[int] = []
        self._samples: list[np.ndarray] = []
        # Every rank checks (read-only), so that all stop together rather than rank 0 alone while the rest wait.
        self._check_dataset(dataset.manifest, resume_step)
        if rank == 0:  # the other ranks write only at flush, after collectives that follow this
            self.dir.mkdir(parents=True, exist_ok=True)
            write_atomically(self.dir / DATASET_FILE, json.dumps(dataset.manifest, indent=1).encode("utf-8"))
            self._drop_from(resume_step)

    def _check_dataset(self, manifest: dict, resume_step: int) -> None:
        path = self.dir / DATASET_FILE
        if resume_step > 0 and path.is_file():
            logged = json.loads(path.read_text(encoding="utf-8"))
            if logged.get("fingerprint") != manifest["fingerprint"]:
                raise InputError(f"{path}: the run was logged with other training data or order settings "
                                 f"(fingerprint {logged.get('fingerprint')}, now {manifest['fingerprint']}); "
                                 f"resuming would mix two sample orders")

    def _drop_from(self, step: int) -> None:
        """Set the logged steps >= `step` aside (they belong to the continuation this run replaces): whole segment
        files move to `replaced-at-XXXXXXXX/` (never deleted); a segment that straddles `step` keeps its earlier part."""
        replaced = self.dir / f"replaced-at-{step:08d}"
        for path in sorted(self.dir.glob("steps-*.npz")):
            match = _SEGMENT.match(path.name)
            if match is None or int(match.group(2)) < step:
                continue
            if int(match.group(1)) < step:  # keep the part before `step`
                data = _read_npz(path)
                keep = data["steps"] < step
                rank, world = int(match.group(3)), int(match.group(4))
                last = int(data["steps"][keep].max())
                _write_npz(self.dir / _segment_name(int(match.group(1)), last, rank, world),
                           steps=data["steps"][keep], samples=data["samples"][keep])
            replaced.mkdir(exist_ok=True)
            target = replaced / path.name
            if target.exists():  # from an earlier resume at the same step
                set_aside(target, "old")
            path.rename(target)

    def record(self, step: int, sample_index) -> None:
        """This rank's global sample ids of optimizer step `step` (a tensor or array); kept in memory."""
        if hasattr(sample_index, "detach"):
            sample_index = sample_index.detach().cpu().numpy()
        self._steps.append(int(step))
        self._samples.append(np.asarray(sample_index).astype(self.dtype))

    def flush(self, upto_step: int) -> Path | None:
        """Write the recorded steps < upto_step (call right before saving the checkpoint of upto_step)."""
        n = sum(1 for s in self._steps if s < upto_step)
        if n == 0:
            return None
        steps, samples = np.asarray(self._steps[:n], dtype=np.int64), np.stack(self._samples[:n])
        path = self.dir / _segment_name(int(steps[0]), int(steps[-1]), self.rank, self.world_size)
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_npz(path, steps=steps, samples=samples)
        del self._steps[:n], self._samples[:n]
        return path


class DatapointLog:
    """A run's datapoint log, merged over ranks, flushes and world sizes, with its dataset."""

    def __init__(self, run_dir, data_dirs: Sequence[str] | None = None) -> None:
        self.dir = RunDir(run_dir).datapoints
        manifest_path = self.dir / DATASET_FILE
        if not manifest_path.is_file():
            raise InputError(f"{run_dir}: no datapoint log ({manifest_path} is missing)")
        self.manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        self.data_dirs = list(data_dirs) if data_dirs else [s["path"] for s in self.manifest["sources"]]
        if len(self.data_dirs) != len(self.manifest["sources"]):
            raise InputError(f"--data_dir: {len(self.data_dirs)} directories for {len(self.manifest['sources'])} "
                             f"logged sources")
        columns: dict[str, list[np.ndarray]] = {"step": [], "world": [], "rank": [], "slot": [], "sample": []}
        step_rows: list[tuple[np.ndarray, int, int]] = []
        for path in sorted(self.dir.glob("steps-*.npz")):
            match = _SEGMENT.match(path.name)
            if match is None:
                continue
            data = _read_npz(path)
            rank, world = int(match.group(3)), int(match.group(4))
            n, k = data["samples"].shape
            step_rows.append((data["steps"].astype(np.int64), world, rank))
            columns["step"].append(np.repeat(data["steps"].astype(np.int64), k))
            columns["world"].append(np.full(n * k, world, dtype=np.int64))
            columns["rank"].append(np.full(n * k, rank, dtype=np.int64))
            columns["slot"].append(np.tile(rank * k + np.arange(k, dtype=np.int64), n))  # position within the step
            columns["sample"].append(data["samples"].astype(np.int64).ravel())
        flat = {key: np.concatenate(value) if value else np.zeros(0, np.int64) for key, value in columns.items()}
        self.step_col, self.rank_col = flat["step"], flat["rank"]
        self.slot_col, self.sample_col = flat["slot"], flat["sample"]
        self.world_sizes = self._check(step_rows)
        self._dataset: PackedDataset | None = None

    def _check(self, step_rows: list[tuple[np.ndarray, int, int]]) -> dict[int, int]:
        """{step: world size}; every logged step must come from exactly one complete set of ranks."""
        if not step_rows:
            return {}
        steps = np.concatenate([s for s, _, _ in step_rows])
        worlds = np.concatenate([np.full(len(s), w) for s, w, _ in step_rows])
        ranks = np.concatenate([np.full(len(s), r) for s, _, r in step_rows])
        order = np.lexsort((ranks, steps))
        steps, worlds, ranks = steps[order], worlds[order], ranks[order]
        first = np.concatenate([[0], np.nonzero(np.diff(steps))[0] + 1])
        sizes = np.diff(np.concatenate([first, [len(steps)]]))
        expected_rank = np.arange(len(steps)) - np.repeat(first, sizes)
        bad = (np.minimum.reduceat(worlds, first) != np.maximum.reduceat(worlds, first)) | (sizes != worlds[first])
        bad |= np.logical_or.reduceat(ranks != expected_rank, first)
        if bad.any():
            step = int(steps[first[np.argmax(bad)]])
            raise InputError(f"{self.dir}: step {step} is logged inconsistently (overlapping runs or missing ranks)")
        return dict(zip(steps[first].tolist(), worlds[first].tolist()))

    @property
    def steps(self) -> list[int]:
        return sorted(self.world_sizes)

    @property
    def dataset(self) -> PackedDataset:
        if self._dataset is None:
            m = self.manifest
            self._dataset = PackedDataset(self.data_dirs, m["weights"], block_size=m["block_size"], seed=m["seed"])
            if self._dataset.manifest["fingerprint"] != m["fingerprint"]:
                raise InputError(f"data in {', '.join(map(str, self.data_dirs))} differs from the logged training "
                                 f"data (fingerprint mismatch); pass the original folders with --data_dir")
        return self._dataset

    def samples(self, step: int) -> np.ndarray:
        """All sample ids of a step in global order (rank 0's first)."""
        at = np.nonzero(self.step_col == step)[0]
        return self.sample_col[at[np.argsort(self.slot_col[at])]]

    def missing_steps(self, until_step: int) -> list[int]:
        return [s for s in range(until_step) if s not in self.world_sizes]

    def samples_until(self, until_step: int) -> np.ndarray:
        return np.unique(self.sample_col[self.step_col < until_step])

    def documents_of_samples(self, sample_ids: np.ndarray) -> list[str]:
        """Ids of the documents with at least one token in any of the samples, in dataset order."""
        ds = self.dataset
        sources, starts = ds.locate(sample_ids)
        found: list[str] = []
        for s in np.unique(sources):
            source = ds.sources[int(s)]
            if not source.has_index:
                raise InputError(f"{source.directory}: no document index, documents cannot be named")
            first = starts[sources == s]
            last = np.minimum(first + ds.sample_tokens, source.tokens) - 1
            lo, hi = source.doc_numbers(first), source.doc_numbers(last)
            numbers = np.unique(np.concatenate([np.arange(a, b + 1) for a, b in zip(lo, hi)]))
            found.extend(document_ids(source, numbers))
        return found

    def documents_until(self, until_step: int) -> list[str]:
        return self.documents_of_samples(self.samples_until(until_step))

    def steps_of_document(self, doc_id: str) -> list[tuple[int, int, int]]:
        """(step, rank, sample id) of every logged sample holding a token of document `doc_id`."""
        ds = self.dataset
        wanted: set[int] = set()
        found = False
        for s, source in enumerate(ds.sources):
            for number in _find_document(source, doc_id):
                found = True
                start = source.doc_start(number)
                end = source.doc_start(number + 1) if number + 1 < source.documents else source.tokens
                first, last = start // ds.sample_tokens, (end - 1) // ds.sample_tokens
                wanted.update(int(ds.sample_offsets[s]) + j for j in range(first, last + 1))
        if not found:
            raise InputError(f"no document with id {doc_id!r} in {', '.join(map(str, self.data_dirs))}")
        at = np.nonzero(np.isin(self.sample_col, list(wanted)))[0]
        at = at[np.lexsort((self.slot_col[at], self.step_col[at]))]
        return list(zip(self.step_col[at].tolist(), self.rank_col[at].tolist(), self.sample_col[at].tolist()))


def document_ids(source, numbers: np.ndarray) -> list[str]:
    """The corpus ids of documents `numbers` (ascending) of a source with a document index."""
    first_docs = np.array([c["first_doc"] for c in source.chunks])
    chunk_of = np.searchsorted(first_docs, numbers, side="right") - 1
    ids = []
    for c in np.unique(chunk_of):  # the chunk where each document starts
        index = source.index_of_chunk(int(c))
        ids.extend(index["doc_ids"][int(n) - index["first_doc"]] for n in numbers[chunk_of == c])
    return ids


def _find_document(source, doc_id: str) -> list[int]:
    if not source.has_index:
        print(f"warning: {source.directory} has no document index; skipped", file=sys.stderr)
        return []
    numbers = []
    for c in range(len(source.chunks)):
        index = source.index_of_chunk(c)
        numbers.extend(index["first_doc"] + j for j, d in enumerate(index["doc_ids"]) if d == doc_id)
    return numbers
