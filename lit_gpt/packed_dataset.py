"""Memory-mapped LITPKDS chunks, mixed sources, and the per-optimizer-step loader.

A source is a directory of chunk files read as one token stream: the files of its `manifest.json` (written by
`scripts/prepare_data.py`; only each file's real tokens count) or, for TinyLlama-written folders, all `*.bin` files
in name order (every token counts). Samples are consecutive, non-overlapping windows of block_size + 1 tokens of
that stream (they may span chunk boundaries); a last partial window is kept and padded, its padding masked in
`labels`. Sample ids number the samples of all sources consecutively.

The global order (`lit_gpt.sample_order`) maps position p = 0, 1, 2, ... to a sample id as a pure function of
(seed, data, epoch), independent of ranks and workers. `StepLoader` gives optimizer step s the positions
[s * G, (s + 1) * G); rank r takes its contiguous share [s*G + r*G/W, s*G + (r+1)*G/W), micro-batch m the m-th
slice of b. Resuming at step k is O(1): nothing is replayed, and any world size sees the same samples per step.
"""
from __future__ import annotations

import hashlib
import json
import math
import mmap
import multiprocessing
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Sequence
from itertools import count
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lit_gpt.attention import DocumentMask
from lit_gpt.checkpoint import ranks, verify
from lit_gpt.data_skips import DataSkips
from lit_gpt.errors import InputError
from lit_gpt.litpkds import HEADER_SIZE, ChunkFormatError, read_header
from lit_gpt.node_cache import NodeCache
from lit_gpt.sample_order import SampleOrder

INDEX_DIR = "index"
ORDER_VERSION = 1
MIX_VERSION = 2  # weighted mixing; 2: the rounding of the shares carries over between mixing windows
SHUFFLE = {"block": 256, "window": 64, "mix_window": 1 << 16}
_OPEN_MAPS = 128
_OPEN_INDEXES = 256
# Forked workers start at once and share the opened dataset; spawned ones (the default some libraries set
# process-wide) re-import torch and were seen aborting at shutdown while busy. Fork where the platform has it.
_WORKER_START = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
GROUP_TOKENS = 1 << 20  # tokens StepLoader reads per array (see StepLoader.__iter__)


class DataError(InputError, ValueError):
    """A prepared data directory, manifest, chunk or index that cannot be used; the message names the file. (Also a
    ValueError for the callers that catch those.)"""


class DataSource:
    """One directory of chunk files as a single token stream.

    Token ids are checked when a chunk is first opened (its min and max, once per file): they must lie below the
    vocab_size of the tokenizer recorded in the manifest, or else below the model's `vocab_size`, when given.
    """

    def __init__(self, directory: Path, cache: NodeCache | None = None, vocab_size: int | None = None) -> None:
        self.directory = Path(directory)
        self.cache = cache
        if not self.directory.is_dir():
            raise DataError(f"{self.directory}: data directory does not exist")
        manifest = self.directory / "manifest.json"
        self.vocab_size, self.vocab_source = vocab_size, "the model's"
        if manifest.is_file():
            self._from_manifest(manifest)
        else:
            self._from_files()
        if cache is not None:
            for chunk in self.chunks:
                if chunk["sha256"]:
                    cache.expect(chunk["path"], chunk["sha256"])
        self.offsets = np.concatenate([[0], np.cumsum([c["tokens"] for c in self.chunks])]).astype(np.int64)
        self._offsets = self.offsets.tolist()  # bisect on a list beats numpy for single lookups
        self.tokens = int(self.offsets[-1])
        self._checked: set[int] = set()  # chunks whose token ids were checked
        self._maps: OrderedDict[int, np.ndarray] = OrderedDict()
        self._indexes: OrderedDict[int, np.ndarray] = OrderedDict()

    def _from_manifest(self, path: Path) -> None:
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
            entries = [(e["name"], int(e["tokens"]), int(e["first_doc"]), e.get("sha256")) for e in manifest["files"]]
            self.pad_id = int(manifest.get("pad_id", 0))
            self.documents = int(manifest["documents"])
            data_vocab = manifest.get("tokenizer", {}).get("vocab_size")
            data_vocab = None if data_vocab is None else int(data_vocab)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise DataError(f"{path}: unreadable dataset manifest ({type(e).__name__}: {e})") from None
        if not entries:
            raise DataError(f"{self.directory}: the manifest lists no chunk files (empty split)")
        if data_vocab is not None:
            if self.vocab_size is not None and data_vocab > self.vocab_size:
                raise DataError(f"{path}: the data was made with a tokenizer of {data_vocab} tokens, more than the "
                                 f"model's vocab_size {self.vocab_size}: data made with another tokenizer?")
            self.vocab_size, self.vocab_source = data_vocab, f"the tokenizer's, says {path.name}"
        if self.vocab_size is not None and not 0 <= self.pad_id < self.vocab_size:
            raise DataError(f"{path}: pad_id {self.pad_id} is not a token id of vocab_size {self.vocab_size}")
        self.chunks = []
        for name, tokens, first_doc, sha256 in entries:
            chunk = self._chunk(self.directory / name)
            if not 0 < tokens <= chunk["chunk_size"]:
                raise DataError(f"{chunk['path']}: the manifest says {tokens} real tokens, the header holds "
                                 f"{chunk['chunk_size']}")
            index = self.directory / INDEX_DIR / (chunk["path"].stem + ".json")
            if not index.is_file():
                raise DataError(f"{index}: document index of {name} is missing")
            chunk.update(tokens=tokens, index=index, first_doc=first_doc, sha256=sha256)
            self.chunks.append(chunk)
        self.fingerprint = _sha256([(name, tokens, sha) for name, tokens, _, sha in entries])

    def _from_files(self) -> None:
        paths = sorted(self.directory.glob("*.bin"))
        if (self.directory / INDEX_DIR).is_dir():
            raise DataError(f"{self.directory}: chunk indexes but no manifest.json; the preparation did not finish "
                             f"(re-run scripts/prepare_data.py)")
        if not paths:
            raise DataError(f"{self.directory}: no chunk files (*.bin) and no manifest.json")
        self.chunks = [self._chunk(p) for p in paths]
        for chunk in self.chunks:
            chunk.update(tokens=chunk["chunk_size"], index=None, first_doc=-1, sha256=None)
        self.pad_id, self.documents = 0, None
        self.fingerprint = _sha256([(c["path"].name, c["chunk_size"], c["dtype"].name) for c in self.chunks])

    @staticmethod
    def _chunk(path: Path) -> dict:
        dtype, chunk_size = read_header(path)  # checks magic, version, dtype and file size; names the file
        return {"path": path, "dtype": dtype, "chunk_size": chunk_size}

    @property
    def has_index(self) -> bool:
        return self.documents is not None

    def samples(self, sample_tokens: int) -> int:
        """Full windows, plus a padded last one when at least one (input, label) pair is left."""
        full, rest = divmod(self.tokens, sample_tokens)
        return full + (rest >= 2)

    # ------------------------------------------------------------------ tokens
    def chunk_of(self, positions) -> np.ndarray:
        return np.searchsorted(self.offsets, positions, side="right") - 1

    def read(self, start: int, stop: int, out: np.ndarray) -> None:
        """Stream tokens [start, stop) into out[:stop - start]."""
        offsets = self._offsets
        c, pos = bisect_right(offsets, start) - 1, start
        while pos < stop:
            end = min(stop, offsets[c + 1])
            base = offsets[c]
            out[pos - start:end - start] = self._map(c)[pos - base:end - base]
            pos, c = end, c + 1

    def _map(self, c: int) -> np.ndarray:
        """The chunk's tokens as a read-only array over a memory map (a plain ndarray: cheap to slice)."""
        maps = self._maps
        if c in maps:
            maps.move_to_end(c)
            return maps[c]
        chunk = self.chunks[c]
        path = self.cache.path(chunk["path"]) if self.cache is not None else chunk["path"]
        try:
            array = _map_tokens(path, chunk["dtype"], chunk["chunk_size"])
        except OSError:
            if path == chunk["path"]:
                raise
            array = _map_tokens(chunk["path"], chunk["dtype"], chunk["chunk_size"])  # the copy was just evicted
        if c not in self._checked:
            self._check_ids(chunk, array[:chunk["tokens"]])
            self._checked.add(c)
        maps[c] = array
        if len(maps) > _OPEN_MAPS:
            maps.popitem(last=False)
        return array

    def _check_ids(self, chunk: dict, tokens: np.ndarray) -> None:
        """Ids outside [0, vocab_size) would index past the embedding mid-run (or, below the padded size, train
        rows no token maps to): one error naming the chunk instead."""
        if self.vocab_size is None or not tokens.size:
            return
        top, low = int(tokens.max()), int(tokens.min())
        if top >= self.vocab_size:
            problem = f"token id {top} >= vocab_size {self.vocab_size} ({self.vocab_source})"
        elif low < 0:
            problem = f"negative token id {low}"
        else:
            return
        raise ChunkFormatError(f"{chunk['path']}: {problem}: data made with another tokenizer, or damaged?")

    def verify_checksums(self, chunks: Sequence[int]) -> list[str]:
        """What is wrong with these chunks' bytes: each must hash to the sha256 its manifest records."""
        def check(c: int) -> str | None:
            chunk = self.chunks[c]
            if verify.sha256_file(chunk["path"]) != chunk["sha256"]:
                return verify.sha256_mismatch(chunk["path"], "manifest.json")
            return None

        return [p for p in verify.in_threads(check, chunks) if p]

    # ------------------------------------------------------------------ documents
    def doc_starts(self, start: int, stop: int) -> np.ndarray:
        """Stream positions in [start, stop) where a document starts."""
        found = []
        for c in range(int(self.chunk_of(start)), int(self.chunk_of(stop - 1)) + 1):
            starts = self._index(c) + self.offsets[c]
            found.append(starts[(starts >= start) & (starts < stop)])
        return np.concatenate(found)

    def doc_numbers(self, positions: np.ndarray) -> np.ndarray:
        """Number (within this source) of the document holding each stream position."""
        positions = np.asarray(positions, dtype=np.int64)
        chunks = self.chunk_of(positions)
        out = np.empty_like(positions)
        for c in np.unique(chunks):
            at = np.nonzero(chunks == c)[0]
            inside = np.searchsorted(self._index(int(c)), positions[at] - self.offsets[c], side="right") - 1
            out[at] = self.chunks[c]["first_doc"] + inside
        return out

    def doc_start(self, number: int) -> int:
        """Stream position where document `number` starts."""
        first_docs = np.array([c["first_doc"] for c in self.chunks])
        c = int(np.searchsorted(first_docs, number, side="right") - 1)  # the chunk where it starts
        return int(self.offsets[c] + self._index(c)[number - self.chunks[c]["first_doc"]])

    def index_of_chunk(self, c: int) -> dict:
        """The chunk's index file: tokens, doc_starts, doc_ids, first_doc."""
        path = self.chunks[c]["index"]
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: unreadable chunk index ({e})") from None

    def _index(self, c: int) -> np.ndarray:
        if c in self._indexes:
            self._indexes.move_to_end(c)
            return self._indexes[c]
        starts = np.asarray(self.index_of_chunk(c)["doc_starts"], dtype=np.int64)
        self._indexes[c] = starts
        if len(self._indexes) > _OPEN_INDEXES:
            self._indexes.popitem(last=False)
        return starts

    def __getstate__(self) -> dict:  # data-loader workers reopen their own maps
        state = self.__dict__.copy()
        state.update(_maps=OrderedDict(), _indexes=OrderedDict())
        return state


class PackedDataset:
    """Samples of block_size + 1 tokens from one or more sources, in a deterministic global order."""

    def __init__(self, sources: Sequence, weights: Sequence[float] | None = None, block_size: int = 2048,
                 seed: int = 42, with_doc_ids: bool = False, cache_dir=None, cache_max_bytes: int | None = None,
                 vocab_size: int | None = None):
        if isinstance(sources, (str, Path)):
            sources = [sources]
        if not sources:
            raise ValueError("PackedDataset: no data directories given")
        if block_size < 1:
            raise ValueError(f"block_size {block_size}: must be positive")
        if weights is not None:
            weights = [float(w) for w in weights]
            if len(weights) != len(sources):
                raise ValueError(f"{len(weights)} weights for {len(sources)} data directories")
            if not all(math.isfinite(w) and w > 0 for w in weights):
                raise ValueError(f"weights {weights}: must be positive numbers")
        self.block_size, self.seed, self.weights, self.with_doc_ids = block_size, seed, weights, with_doc_ids
        self.sample_tokens = block_size + 1
        self.cache = NodeCache(cache_dir, cache_max_bytes) if cache_dir else None
        self.sources = [DataSource(Path(s), self.cache, vocab_size) for s in sources]
        sizes = [s.samples(self.sample_tokens) for s in self.sources]
        for source, size in zip(self.sources, sizes):
            if size == 0:
                raise DataError(f"{source.directory}: holds only {source.tokens} token(s), not one sample")
            if with_doc_ids and not source.has_index:
                raise DataError(f"{source.directory}: no document index (not written by prepare_data.py), "
                                 f"so doc_ids cannot be produced")
        self.order = SampleOrder(sizes, weights, seed, **SHUFFLE)
        self.sample_offsets = self.order.offsets
        self.samples_per_epoch = int(self.sample_offsets[-1])
        self.manifest = self._describe(sizes)

    def verify_checksums(self) -> int:
        """Hash every chunk against its manifest's sha256 (collective with several ranks, which split the chunks);
        raises ValueError naming the damaged chunks. Returns the number of chunks verified."""
        jobs = [(s, c) for s, source in enumerate(self.sources) for c, chunk in enumerate(source.chunks)
                if chunk["sha256"]]
        rank, world_size = ranks.rank_and_world_size()
        mine = jobs[rank::world_size]
        problems = [p for s, source in enumerate(self.sources)
                    for p in source.verify_checksums([c for js, c in mine if js == s])]
        problems = [p for rank_problems in ranks.gather(problems) for p in rank_problems]
        if problems:
            more = f" (and {len(problems) - 1} more damaged chunks)" if len(problems) > 1 else ""
            raise ChunkFormatError(problems[0] + more)
        return len(jobs)

    def _describe(self, sizes: list[int]) -> dict:
        sources = [{"path": str(s.directory.resolve()), "files": len(s.chunks), "tokens": s.tokens, "samples": n,
                    "documents": s.documents, "fingerprint": s.fingerprint} for s, n in zip(self.sources, sizes)]
        order = {"order_version": ORDER_VERSION, "block_size": self.block_size, "seed": self.seed,
                 "weights": self.weights, "shuffle": SHUFFLE, "sources": [s["fingerprint"] for s in sources]}
        if self.weights is not None:  # a log of a weighted run of another mixing version has another order
            order["mix_version"] = MIX_VERSION
        return {**order, "sources": sources, "samples_per_epoch": self.samples_per_epoch,
                "fingerprint": _sha256(order)}

    # ------------------------------------------------------------------ samples
    def sample_ids(self, positions) -> np.ndarray:
        """Global order: positions -> sample ids."""
        return self.order(positions)

    def locate(self, sample_ids) -> tuple[np.ndarray, np.ndarray]:
        """(source index, first stream token) of each sample."""
        sample_ids = np.asarray(sample_ids, dtype=np.int64)
        if sample_ids.size and (sample_ids.min() < 0 or sample_ids.max() >= self.samples_per_epoch):
            raise IndexError(f"sample ids must lie in [0, {self.samples_per_epoch})")
        source = np.searchsorted(self.sample_offsets, sample_ids, side="right") - 1
        return source, (sample_ids - self.sample_offsets[source]) * self.sample_tokens

    def get_batch(self, sample_ids) -> dict[str, Any]:
        """input_ids/labels [b, T] (labels -100 on padding), sample_index [b] and, if asked for, doc_ids [b, T] and
        their doc_mask (a lit_gpt.attention.DocumentMask)."""
        return self.batch_from_rows(torch.from_numpy(self.read_rows(sample_ids)))

    def read_rows(self, sample_ids) -> np.ndarray:
        """The samples as int64 rows [S tokens | real tokens | sample id | T doc ids, if asked for]: everything a batch
        needs in one array, which a loader worker hands over in one transfer (see StepLoader.__iter__)."""
        sample_ids = np.asarray(sample_ids, dtype=np.int64)
        sources, starts = self.locate(sample_ids)
        T, S = self.block_size, self.sample_tokens
        rows = np.empty((len(sample_ids), S + 2 + (T if self.with_doc_ids else 0)), dtype=np.int64)
        rows[:, S], rows[:, S + 1] = S, sample_ids
        for row, (s, start) in enumerate(zip(sources.tolist(), starts.tolist())):
            source = self.sources[s]
            stop = min(start + S, source.tokens)
            source.read(start, stop, rows[row])
            if stop - start < S:  # the last, partial sample of a source
                rows[row, S] = stop - start
                rows[row, stop - start:S] = source.pad_id
            if self.with_doc_ids:  # count of document starts up to each position: changes exactly at a start
                rows[row, S + 2:] = np.searchsorted(source.doc_starts(start, stop) - start, np.arange(T), side="right")
        return rows

    def batch_from_rows(self, rows) -> dict[str, Any]:
        """Split `read_rows` output (array or tensor) into the batch tensors; in numpy, whose small ops cost less.

        The document mask is computed here on the host, so the training step needs no device synchronisation; when
        this process uses CUDA the batch is pinned, so that it can be copied with `non_blocking=True`."""
        rows = rows.numpy() if isinstance(rows, torch.Tensor) else rows
        T, S = self.block_size, self.sample_tokens
        real = rows[:, S]
        labels = rows[:, 1:S].copy()
        if (real < S).any():
            labels[np.arange(T)[None, :] >= (real - 1)[:, None]] = -100  # padding carries no loss
        arrays = {"input_ids": rows[:, :T], "labels": labels, "sample_index": rows[:, S + 1]}
        if self.with_doc_ids:
            arrays["doc_ids"] = rows[:, S + 2:]  # the padding continues the last document
        batch: dict[str, Any] = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
        if self.with_doc_ids:
            batch["doc_mask"] = DocumentMask.from_doc_ids(arrays["doc_ids"])
        if torch.cuda.is_initialized():  # pinning needs CUDA: never start it in a CPU-only run
            batch = {k: v.pin_memory() for k, v in batch.items()}
        return batch

    def chunk_paths(self, sample_ids) -> list[Path]:
        """Chunk files the samples read, in order of first use (for node-local prefetching)."""
        sources, starts = self.locate(sample_ids)
        paths: dict[Path, None] = {}
        for s, start in zip(sources.tolist(), starts.tolist()):
            source = self.sources[s]
            stop = min(start + self.sample_tokens, source.tokens)
            for c in range(int(source.chunk_of(start)), int(source.chunk_of(stop - 1)) + 1):
                paths[source.chunks[c]["path"]] = None
        return list(paths)

    def __repr__(self) -> str:
        return (f"PackedDataset({len(self.sources)} source(s), {self.samples_per_epoch} samples of "
                f"{self.sample_tokens} tokens, weights={self.weights}, seed={self.seed})")


class StepLoader:
    """Yields (step, micro_batches) forever from `start_step`; micro_batches are this rank's share of the step.
    Training step s reads data step d = `skips`.data_step(s) (d = s without skips), positions d*G + rank*G/W + i."""

    def __init__(self, dataset: PackedDataset, global_batch_size: int, micro_batch_size: int, rank: int = 0,
                 world_size: int = 1, start_step: int = 0, num_workers: int = 0,
                 skips: DataSkips | None = None) -> None:
        G, b, W = global_batch_size, micro_batch_size, world_size
        if min(G, b, W) < 1 or G % (W * b):
            raise ValueError(f"global_batch_size {G} must be a positive multiple of micro_batch_size {b} x "
                             f"devices {W} (= {b * W})")
        if not 0 <= rank < W:
            raise ValueError(f"rank {rank} outside world_size {W}")
        if start_step < 0 or num_workers < 0:
            raise ValueError(f"start_step {start_step} and num_workers {num_workers} must not be negative")
        self.dataset, self.global_batch_size, self.micro_batch_size = dataset, G, b
        self.rank, self.world_size, self.start_step, self.num_workers = rank, W, start_step, num_workers
        self.per_rank = G // W
        self.skips = skips or DataSkips()
        self.group_steps = max(1, GROUP_TOKENS // (self.per_rank * dataset.sample_tokens))

    def positions(self, step: int, steps: int = 1) -> np.ndarray:
        """Global sample positions of this rank for `steps` consecutive training steps from `step`."""
        firsts = self.skips.data_steps(step, steps) * self.global_batch_size + self.rank * self.per_rank
        return (firsts[:, None] + np.arange(self.per_rank, dtype=np.int64)).ravel()

    def step_rows(self, step: int, steps: int = 1) -> torch.Tensor:
        """This rank's samples of `steps` steps from `step` as one array (see PackedDataset.read_rows)."""
        return torch.from_numpy(self.dataset.read_rows(self.dataset.sample_ids(self.positions(step, steps))))

    def group(self, g: int) -> tuple[int, int]:
        """(first step, number of steps) of read group g."""
        return self.start_step + g * self.group_steps, self.group_steps

    def split(self, rows: torch.Tensor) -> list[dict[str, Any]]:
        """One step's rows -> its micro-batches."""
        b = self.micro_batch_size
        return [self.dataset.batch_from_rows(rows[i:i + b]) for i in range(0, len(rows), b)]

    def __iter__(self):
        # Steps are read in groups of about GROUP_TOKENS tokens, one array per group: the per-read overhead is paid
        # once per group and a loader worker hands over one shared-memory tensor per group instead of several per
        # micro-batch. The split into steps and micro-batches happens here, in the training process.
        groups = _StepGroups(self)
        if self.num_workers == 0:
            arrays, lookahead = map(groups.__getitem__, count()), 1
        else:
            arrays = iter(torch.utils.data.DataLoader(groups, batch_size=None, sampler=_Count(),
                                                      num_workers=self.num_workers, collate_fn=_identity,
                                                      multiprocessing_context=_WORKER_START))
            lookahead = 2 * self.num_workers + 1  # the DataLoader reads prefetch_factor (2) groups per worker ahead
        cache, hinted = self.dataset.cache, 0
        for g, rows_of_group in enumerate(arrays):
            while cache is not None and hinted <= g + lookahead:  # copy node-locally what the next groups read
                cache.prefetch(self.dataset.chunk_paths(self.dataset.sample_ids(self.positions(*self.group(hinted)))))
                hinted += 1
            first, _ = self.group(g)
            for i, rows in enumerate(rows_of_group.split(self.per_rank)):
                yield first + i, self.split(rows)


class _StepGroups(torch.utils.data.Dataset):
    """Item g: the rows of read group g (see StepLoader.group)."""

    def __init__(self, loader: StepLoader) -> None:
        self.loader = loader

    def __getitem__(self, g: int) -> torch.Tensor:
        return self.loader.step_rows(*self.loader.group(g))


class _Count(torch.utils.data.Sampler):
    def __iter__(self):
        return count()


def _map_tokens(path: Path, dtype: np.dtype, count: int) -> np.ndarray:
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return np.frombuffer(mapped, dtype=dtype, count=count, offset=HEADER_SIZE)


def _identity(x):
    return x


def _sha256(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
