"""Asynchronous sharded checkpoints (`lit_gpt.checkpoint.async_save`): in one process, the finishing logic (what the
state was when the save started is what is published, only when finished; one save in flight; rotation; a full disk
is one SaveError that keeps the earlier checkpoints; an abandoned save leaves nothing); with the trainer, 2-rank FSDP
runs with async checkpoints train and resume to the losses of synchronous ones, and a kill mid-write resumes from the
previous checkpoint."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch
from test_checkpoints import trained

from lit_gpt.checkpoint.async_save import AsyncCheckpointer
from lit_gpt.checkpoint.find import latest_checkpoint, list_checkpoints, verify_checkpoint
from lit_gpt.checkpoint.layout import SaveError
from lit_gpt.checkpoint.load import load_training_state
from lit_gpt.checkpoint.save import save_checkpoint
from lit_gpt.run_dir import RunDir

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # one-process DCP saves, on purpose


def loaded(path: Path, seed: int = 5):
    """The model and optimizer state of checkpoint `path`, loaded into a differently initialised copy."""
    model, optimizer = trained(seed)
    meta = load_training_state(path, model, optimizer)
    return model, optimizer, meta


def written(checkpointer: AsyncCheckpointer) -> None:
    assert checkpointer.pending.written.wait(timeout=60)


def test_publishes_the_state_at_start_only_when_finished(tmp_path):
    model, optimizer = trained()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    expected_moment = optimizer.state[model[0].weight]["exp_avg"].clone()
    checkpointer = AsyncCheckpointer()
    path = RunDir(tmp_path).checkpoint(2)
    checkpointer.start(path, model, optimizer, {"step": 2})
    with torch.no_grad():  # training goes on while the write is in flight
        for p in model.parameters():
            p.add_(1.0)
        optimizer.state[model[0].weight]["exp_avg"].mul_(3.0)
    written(checkpointer)
    assert checkpointer.done_locally()
    assert not path.exists() and (tmp_path / f"{path.name}.tmp").is_dir()  # written, not yet published
    assert list_checkpoints(tmp_path) == []
    assert checkpointer.finish() == path and checkpointer.pending is None and not checkpointer.done_locally()
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    assert verify_checkpoint(path) is True
    model2, optimizer2, meta = loaded(path)
    assert meta["step"] == 2
    for key, value in model2.state_dict().items():
        assert torch.equal(value, expected[key]), key  # the staged copy, not the parameters changed since
    assert torch.equal(optimizer2.state[model2[0].weight]["exp_avg"], expected_moment)


def test_same_bytes_as_a_synchronous_save(tmp_path):
    model, optimizer = trained()
    save_checkpoint(RunDir(tmp_path / "sync").checkpoint(1), model, optimizer, {"step": 1}, "sharded")
    checkpointer = AsyncCheckpointer()
    checkpointer.start(RunDir(tmp_path / "async").checkpoint(1), model, optimizer, {"step": 1})
    checkpointer.wait_and_finish()
    sync, async_ = (RunDir(tmp_path / kind).checkpoint(1) for kind in ("sync", "async"))
    # The same shard bytes, and checksums that say so (.metadata records the path it was written to)
    assert (sync / "__0_0.distcp").read_bytes() == (async_ / "__0_0.distcp").read_bytes()
    shard_lines = [[line for line in (p / "checksums.sha256").read_text().splitlines() if line.endswith(".distcp")]
                   for p in (sync, async_)]
    assert shard_lines[0] == shard_lines[1] and len(shard_lines[0]) == 1


def test_one_save_in_flight_and_rotation(tmp_path):
    checkpointer = AsyncCheckpointer(keep_last=2, log=lambda m: None)
    for step in (1, 2, 3):
        model, optimizer = trained(seed=step)
        checkpointer.start(RunDir(tmp_path).checkpoint(step), model, optimizer, {"step": step})
        # starting save `step` finished save `step - 1` first: it is published, this one is not
        assert [p.name for p in list_checkpoints(tmp_path)][-1:] == ([] if step == 1 else
                                                                    [RunDir(tmp_path).checkpoint(step - 1).name])
    checkpointer.wait_and_finish()
    assert checkpointer.wait_and_finish() is None  # nothing in flight
    assert [p.name for p in list_checkpoints(tmp_path)] == [RunDir(tmp_path).checkpoint(s).name for s in (2, 3)]
    model, optimizer, meta = loaded(RunDir(tmp_path).checkpoint(3))
    reference, _ = trained(seed=3)
    assert meta["step"] == 3 and torch.equal(model[1].weight, reference[1].weight)


def test_a_full_disk_during_the_write_is_one_save_error_and_keeps_the_earlier_checkpoints(tmp_path, monkeypatch):
    import torch.distributed.checkpoint.filesystem as fs

    checkpointer = AsyncCheckpointer(keep_last=1, log=lambda m: None)
    model, optimizer = trained()
    first = RunDir(tmp_path).checkpoint(2)
    checkpointer.start(first, model, optimizer, {"step": 2})
    checkpointer.wait_and_finish()
    real_write = fs._write_item

    def full_disk(*args, **kwargs):
        if "iter-00000004" in str(getattr(args[1], "name", "")):  # the stream of a shard file
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(*args, **kwargs)

    monkeypatch.setattr(fs, "_write_item", full_disk)
    checkpointer.start(RunDir(tmp_path).checkpoint(4), model, optimizer, {"step": 4})
    written(checkpointer)
    assert checkpointer.done_locally()  # failed writes count as done: finishing is where all ranks learn of it
    with pytest.raises(SaveError, match=r"iter-00000004-ckpt.pth: cannot save the checkpoint: no space left on "
                                        r"device .*earlier ones are kept"):
        checkpointer.finish()
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name]
    assert latest_checkpoint(tmp_path) == first and checkpointer.pending is None


def test_close_abandons_the_save_in_flight(tmp_path):
    messages = []
    checkpointer = AsyncCheckpointer(log=messages.append)
    model, optimizer = trained()
    checkpointer.start(RunDir(tmp_path).checkpoint(1), model, optimizer, {"step": 1})
    checkpointer.wait_and_finish()
    checkpointer.start(RunDir(tmp_path).checkpoint(2), model, optimizer, {"step": 2})
    checkpointer.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [RunDir(tmp_path).checkpoint(1).name]
    assert messages[-1] == f"note: abandoned the unfinished checkpoint {RunDir(tmp_path).checkpoint(2)}"
    assert checkpointer.pending is None
