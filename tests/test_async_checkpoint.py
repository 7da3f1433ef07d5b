"""Asynchronous sharded checkpoints (`lit_gpt.checkpoint.async_save`): in one process, the finishing logic (what the
state was when the save started is what is published, only when finished; one save in flight; rotation; a full disk
is one SaveError that keeps the earlier checkpoints; an abandoned save leaves nothing); with the trainer, 2-rank FSDP
runs with async checkpoints train and resume to the losses of synchronous ones, and a kill mid-write resumes from the
previous checkpoint."""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_script
from test_checkpoints import trained
from test_trainer import train, train_losses, trainer_args

from lit_gpt.checkpoint.async_save import STALL_WRITE_ENV, AsyncCheckpointer
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


def test_async_checkpoint_true_with_full_checkpoints_is_refused(prepared_data, tmp_path):
    result = run_script(*trainer_args(prepared_data, tmp_path / "run", async_checkpoint="true",
                                      state_dict_type="full"), check=False)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--async_checkpoint true" in errors[0] and "--state_dict_type sharded" in errors[0]
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


# ------------------------------------------------------------------ the trainer, 2 ranks (FSDP, gloo)
TWO_RANKS = dict(devices=2, strategy="fsdp", state_dict_type="sharded", max_steps=6, save_interval=2,
                 val_data_dir="", keep_last_checkpoints=0)


def shard_digests(checkpoint: Path) -> list[str]:
    return sorted(line for line in (checkpoint / "checksums.sha256").read_text().splitlines()
                  if line.endswith(".distcp"))


def checkpoint_names(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if p.name.startswith("iter-"))


@pytest.fixture(scope="module")
def synchronous_run(prepared_data, tmp_path_factory) -> Path:
    """The reference: the same 2-rank run with synchronous checkpoints."""
    out = tmp_path_factory.mktemp("sync")
    train(prepared_data, out, async_checkpoint="false", **TWO_RANKS)
    return out


@pytest.mark.slow
def test_async_checkpoints_train_and_resume_like_synchronous_ones(prepared_data, synchronous_run, tmp_path):
    sync, async_ = synchronous_run, tmp_path / "async"
    out = train(prepared_data, async_, async_checkpoint="true", **TWO_RANKS)
    reference = train_losses(sync)
    assert sorted(reference) == list(range(1, 7)) and train_losses(async_) == reference  # exactly
    expected = [RunDir(async_).checkpoint(s).name for s in (2, 4, 6)]
    assert checkpoint_names(async_) == checkpoint_names(sync) == expected  # no .tmp left behind
    assert all(f"Saved {async_ / name}" in out.stdout for name in expected)
    for name in expected:
        assert verify_checkpoint(async_ / name) is True
        assert torch.load(async_ / name / "meta.pt", weights_only=True)["step_count"] == int(name[5:13])
        # each rank's shard holds the same bytes as the synchronous save's: the state of the same step
        assert shard_digests(async_ / name) == shard_digests(sync / name) and len(shard_digests(sync / name)) == 2
    # Resumed from its middle checkpoint, the async run retrains steps 5 and 6 to the same losses.
    resumed = train(prepared_data, async_, resume=async_ / expected[1], async_checkpoint="true", **TWO_RANKS)
    assert f"Resumed from {async_ / expected[1]}" in resumed.stdout
    assert train_losses(async_) == reference


@pytest.mark.slow
def test_sigkill_mid_async_write_resumes_from_the_previous_checkpoint(prepared_data, synchronous_run, tmp_path):
    from test_kill_resume import KILLER, killed_run

    wrapper = tmp_path / "killer.py"
    wrapper.write_text(KILLER)
    run = tmp_path / "run"
    common = dict(TWO_RANKS, async_checkpoint="true")
    os.environ[STALL_WRITE_ENV] = "4"  # checkpoint 4's shards are written, its index never is
    try:
        killed_run(prepared_data, run, wrapper, "step:6", **common)  # training went on during the write
    finally:
        del os.environ[STALL_WRITE_ENV]
    assert checkpoint_names(run) == [RunDir(run).checkpoint(2).name, f"{RunDir(run).checkpoint(4).name}.tmp"]
    assert any((run / f"{RunDir(run).checkpoint(4).name}.tmp").glob("*.distcp"))  # killed mid-write
    assert latest_checkpoint(run) == RunDir(run).checkpoint(2)
    out = train(prepared_data, run, resume="auto", **common)
    assert f"Resumed from {RunDir(run).checkpoint(2)}" in out.stdout
    assert train_losses(run) == train_losses(synchronous_run)
    assert checkpoint_names(run) == [RunDir(run).checkpoint(s).name for s in (2, 4, 6)]


@pytest.mark.slow
def test_preemption_waits_for_the_write_in_flight_then_checkpoints(prepared_data, tmp_path):
    out = tmp_path / "run"
    args = trainer_args(prepared_data, out, max_steps=100_000, warmup_steps=10, save_interval=2,
                        state_dict_type="sharded", async_checkpoint="true")
    env = {**os.environ, "OMP_NUM_THREADS": "1", STALL_WRITE_ENV: "2:8"}  # checkpoint 2 is written for 8 s
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").exists() or max(train_losses(out), default=0) < 3:
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
        time.sleep(0.2)
    assert not RunDir(out).checkpoint(2).exists()  # still being written when the signal comes
    proc.send_signal(signal.SIGUSR1)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log
    # The stop comes at the step after the signal, or after the wait for checkpoint 2 at step 4's save: every
    # checkpoint up to the stop is published, in order, and the run's last step is the last one.
    last = max(train_losses(out))
    steps = [*range(2, last, 2), last]
    assert last <= 5 and checkpoint_names(out) == [RunDir(out).checkpoint(s).name for s in steps], log
    saved = [log.index(f"Saved {RunDir(out).checkpoint(s)}") for s in steps]
    assert saved == sorted(saved) and f"Stopped at step {last}" in log
    for step in steps:
        assert verify_checkpoint(RunDir(out).checkpoint(step)) is True
        meta = torch.load(RunDir(out).checkpoint(step) / "meta.pt", weights_only=True)
        assert meta["step_count"] == step


def test_async_checkpoint_auto_follows_the_checkpoint_layout():
    sys.path.insert(0, str(ROOT))
    from lit_gpt.errors import InputError
    from pretrain.tinyllama_fabric import parse_args

    for layout, flag, expected in [("sharded", "auto", True), ("full", "auto", False), ("sharded", "false", False),
                                   ("sharded", "true", True), ("full", "false", False)]:
        cfg = parse_args(["--state_dict_type", layout, "--async_checkpoint", flag])[0]
        assert cfg.async_checkpoints is expected, (layout, flag)
    with pytest.raises(InputError, match="--async_checkpoint true needs --state_dict_type sharded"):
        parse_args(["--state_dict_type", "full", "--async_checkpoint", "true"])
