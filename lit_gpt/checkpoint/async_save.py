"""Sharded checkpoints written in the background, with torch distributed checkpoint's own `async_save`.

The training step stalls only while this rank's state is copied to host memory (pinned on CUDA); DCP's writer thread
writes the shard files while training goes on and, once they are written, hashes (and fsyncs) this rank's share of
them in the same thread. Publishing needs every rank at once (gather the digests; rank 0 writes meta.pt and the checksums,
renames the `.tmp` into place and rotates: `lit_gpt.checkpoint.save.conclude_save`, the synchronous save's last steps),
so the caller decides when: the trainer adds `done_locally()` to the all-reduce every step makes anyway, and when the
sum is the world size every rank calls `finish()` after that same step. At most one save is in flight: `start`
finishes the previous one first.

The synchronous save's guarantees hold: the checkpoint appears under its final name only when complete and
checksummed (a kill mid-write leaves a `.tmp`, which the next save or resume cleans up), a failed write (a full disk)
is one SaveError on every rank with the earlier checkpoints kept, and `close()` (a run ending by an exception)
waits for the write and removes the unfinished checkpoint.

The checkpoint's collectives run in the writer thread on a process group of their own (gloo), so that they never
interleave with the training step's collectives on the default group.
"""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException, FileSystemWriter
from torch.distributed.checkpoint.staging import BlockingAsyncStager
from torch.distributed.checkpoint.state_dict import get_state_dict

from lit_gpt.checkpoint import ranks
from lit_gpt.checkpoint.layout import unwrap
from lit_gpt.checkpoint.publish import fsync_tree, remove
from lit_gpt.checkpoint.save import conclude_save, describe_failure, hash_my_shards, prepare_to_save
from lit_gpt.run_dir import checkpoint_step

# Test-only: "STEP[:SECONDS]", the step whose checkpoint's write stalls (600 s unless given) after its shard files
# are written, so that a test's kill or signal lands mid-write deterministically.
STALL_WRITE_ENV = "LLAMMLEIN_TEST_STALL_ASYNC_WRITE_OF_STEP"


@dataclass
class PendingSave:
    """One checkpoint being written: where, its metadata, and (once `written` is set) this rank's outcome."""
    path: Path
    tmp: Path
    meta: dict[str, Any]
    error: str | None = None
    digests: dict[str, str] = field(default_factory=dict)
    written: threading.Event = field(default_factory=threading.Event)

    def settle(self, future) -> None:
        """The write's done-callback (in the writer thread): hash this rank's shard files, or record the failure."""
        try:
            self.digests = hash_my_shards(self.tmp, future.result())
            for name in self.digests:  # here rather than in the publishing rename, which the training step waits for
                fsync_tree(self.tmp / name)
        except (Exception, CheckpointException) as e:  # dcp raises on every rank when any rank failed
            self.error = describe_failure(self.path, self.tmp, e)
        finally:
            self.written.set()


class AsyncCheckpointer:
    """Sharded checkpoints of one run written in the background; every method but `done_locally` is collective."""

    def __init__(self, keep_last: int = 0, log: Callable[[str], None] = ranks.log,
                 timeout: timedelta | None = None, on_published: Callable[[Path], None] | None = None) -> None:
        """`on_published(path)` runs on every rank once a checkpoint is in place (e.g. to submit its evaluation)."""
        self.keep_last = keep_last
        self.on_published = on_published
        self._log = log
        self._timeout = timeout
        self._group = None  # the checkpoint collectives' own process group, made at the first save
        self._pinned_stager: BlockingAsyncStager | None = None  # CUDA: pinned host buffers, reused by every save
        self.pending: PendingSave | None = None

    def start(self, path: Path, model, optimizer, meta: dict[str, Any]) -> None:
        """Finish the save in flight (if any), copy the state to host memory and write it in the background."""
        self.wait_and_finish()
        path = Path(path)
        pending = PendingSave(path, prepare_to_save(path), dict(meta))
        model, optimizer = unwrap(model, optimizer)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        try:
            future = dcp.async_save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=pending.tmp,
                                    storage_writer=_writer_for_tests(pending), process_group=self._process_group(),
                                    async_stager=self._stager(next(model.parameters()).is_cuda))
        except (Exception, CheckpointException) as e:  # the staging copy failed: a SaveError at finish
            pending.error = describe_failure(path, pending.tmp, e)
            pending.written.set()
        else:
            future.add_done_callback(pending.settle)
        self.pending = pending

    def done_locally(self) -> bool:
        """Whether this rank's part of the save in flight is written and hashed (not collective)."""
        return self.pending is not None and self.pending.written.is_set()

    def finish(self) -> Path:
        """Publish the save in flight (waiting for this rank's write first): every rank calls it after the same step.
        Raises SaveError on every rank if any rank's write failed."""
        pending, self.pending = self.pending, None
        if pending is None:
            raise RuntimeError("no checkpoint save in flight")
        pending.written.wait()
        conclude_save(pending.path, pending.tmp, "sharded", pending.meta, pending.error, pending.digests,
                      self.keep_last)
        self._log(f"Saved {pending.path}")
        if self.on_published is not None:
            self.on_published(pending.path)
        return pending.path

    def wait_and_finish(self) -> Path | None:
        """Finish the save in flight, if there is one (the end of a run, a stop, before the next save)."""
        return self.finish() if self.pending is not None else None

    def close(self) -> None:
        """Abandon a save still in flight (the run ends by an exception): wait for this rank's write, which cannot be
        cancelled, and remove the unfinished checkpoint; the earlier ones are untouched."""
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.written.wait()
            if ranks.is_rank_zero():
                remove(pending.tmp)
                self._log(f"note: abandoned the unfinished checkpoint {pending.path}")
        self._pinned_stager = None  # frees the pinned buffers

    def _stager(self, on_cuda: bool) -> BlockingAsyncStager:
        """The copy to host memory, finished when `async_save` returns (the step may then change the parameters).
        DCP's newer DefaultStager cannot copy FSDP1's ShardedTensors; this one handles them and DTensors."""
        if not on_cuda:  # a fresh copy per save, freed once written
            return BlockingAsyncStager()
        if self._pinned_stager is None:
            self._pinned_stager = BlockingAsyncStager(cache_staged_state_dict=True)
        return self._pinned_stager

    def _process_group(self):
        if self._group is None and ranks.is_initialized():
            self._group = dist.new_group(backend="gloo", timeout=self._timeout)
        return self._group


class _StallingWriter(FileSystemWriter):
    """Test-only: writes the shard files, then stalls before the index (`.metadata`) is written."""

    def __init__(self, path: Path, seconds: float) -> None:
        super().__init__(path)
        self.seconds = seconds

    def write_data(self, plan, planner):
        written = super().write_data(plan, planner)
        written.wait()
        time.sleep(self.seconds)
        return written


def _writer_for_tests(pending: PendingSave) -> FileSystemWriter | None:
    step, _, seconds = os.environ.get(STALL_WRITE_ENV, "").partition(":")
    if step and int(step) == checkpoint_step(pending.path):
        return _StallingWriter(pending.tmp, float(seconds or 600))
    return None
