"""The trainer's library components, each against an independent reference: the learning-rate schedule, AdamW's
parameter groups, per-rank RNG state, the resume policy, the run directory's layout and the atomic-publish helper."""
from __future__ import annotations

import csv
import math
import os
import random
from pathlib import Path

import pytest
import torch

from lit_gpt.checkpoint.publish import open_atomically, point_symlink, replace_path, roll_forward, temporary_name
from lit_gpt.errors import InputError
from lit_gpt.metrics_log import MetricsLog, read_metrics
from lit_gpt.resume import (
    check_out_dir,
    check_resumable,
    resume_checkpoint,
    set_aside_checkpoints_after,
)
from lit_gpt.rng import RNGState
from lit_gpt.run_dir import RunDir, checkpoint_step
from lit_gpt.schedule import LRSchedule, parameter_groups


# ------------------------------------------------------------------ schedule
def test_lr_schedule_closed_form():
    cosine = LRSchedule(learning_rate=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    for step in range(110):
        if step < 10:
            expected = 1e-3 * (step + 1) / 10
        else:
            expected = 1e-4 + 0.5 * (1 + math.cos(math.pi * (step - 10) / 100)) * (1e-3 - 1e-4)
        assert cosine(step) == pytest.approx(expected, rel=1e-12)
    wsd = LRSchedule(1e-3, 1e-4, 10, 110, schedule="wsd", decay_fraction=0.2)  # linear over the last 22 steps
    assert wsd(50) == pytest.approx(1e-3)
    assert wsd(87) == pytest.approx(1e-3)
    assert wsd(88) == pytest.approx(1e-3 + (1e-4 - 1e-3) * 1 / 22)
    assert wsd(109) == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="'linear'"):
        LRSchedule(1e-3, 1e-4, 10, 110, schedule="linear")


@pytest.mark.parametrize("decay_embeddings", [False, True])
def test_parameter_groups_decay_matrices_only(decay_embeddings):
    from lit_gpt.config import Config
    from lit_gpt.model import GPT

    model = GPT(Config.from_name("micro"))
    decay, no_decay = parameter_groups(model, weight_decay=0.1, decay_embeddings=decay_embeddings)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    # The reference: by shape (this model is not flattened), the embedding by its one name.
    name_of = {id(p): n for n, p in model.named_parameters()}
    expected_no_decay = {n for n, p in model.named_parameters()
                         if p.ndim < 2 or (n == "transformer.wte.weight" and not decay_embeddings)}
    assert {name_of[id(p)] for p in no_decay["params"]} == expected_no_decay
    assert {name_of[id(p)] for p in decay["params"]} == set(name_of.values()) - expected_no_decay
    assert "lm_head.weight" not in expected_no_decay and "transformer.ln_f.weight" in expected_no_decay


# ------------------------------------------------------------------ RNG state
def draws() -> tuple:
    return torch.rand(3).tolist(), random.random()


def test_rng_state_round_trip_continues_the_streams():
    rng = RNGState()
    torch.manual_seed(1)
    random.seed(1)
    saved = rng.state_dict()
    expected = draws()
    draws()  # move on
    rng.load_state_dict(saved)
    assert draws() == expected


def test_rng_resume_takes_this_ranks_state_or_reseeds_elastically():
    rng = RNGState()
    states = []
    for seed in (5, 6):  # two ranks' states
        torch.manual_seed(seed)
        states.append(rng.state_dict())
    rng.resume(states, rank=1, world_size=2, seed=42, step=7)  # as many ranks as wrote it: rank 1's own stream
    reference = torch.Generator().manual_seed(6)
    assert torch.rand(4).tolist() == torch.rand(4, generator=reference).tolist()
    rng.resume(states, rank=0, world_size=3, seed=42, step=7)  # written by 2 ranks, resumed on 3
    reference = torch.Generator().manual_seed(42 + 1000003 * 7 + 0)
    assert torch.rand(4).tolist() == torch.rand(4, generator=reference).tolist()


# ------------------------------------------------------------------ run directory
def test_run_dir_layout(tmp_path):
    run = RunDir(tmp_path)
    assert run.checkpoint(1234).name == "iter-00001234-ckpt.pth" and checkpoint_step(run.checkpoint(1234)) == 1234
    assert [p.name for p in (run.hparams, run.model_config, run.tokenizer, run.metrics_jsonl, run.metrics_csv,
                             run.tensorboard, run.wandb_run_id, run.datapoints, run.profile)] == [
        "hparams.json", "model_config.json", "tokenizer", "metrics.jsonl", "metrics.csv", "tensorboard",
        "wandb_run_id", "datapoints", "profile"]
    for name in ("iter-00000010-ckpt.pth", "iter-00000002-ckpt.pth", "iter-00000003-ckpt.pth.tmp",
                 "iter-00000004-ckpt.pth.old", "iter-00000005-ckpt.pth.abandoned", "metrics.jsonl"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in run.checkpoints()] == ["iter-00000002-ckpt.pth", "iter-00000010-ckpt.pth"]
    assert [p.name for p in run.checkpoint_leftovers()] == ["iter-00000003-ckpt.pth", "iter-00000004-ckpt.pth"]
    assert RunDir.of_checkpoint(run.checkpoint(2)).path == tmp_path
    with pytest.raises(ValueError, match="not a checkpoint name"):
        checkpoint_step(tmp_path / "lit_model.pth")


# ------------------------------------------------------------------ resume policy
def ckpt(step=4, batch=8, fingerprint="abc" * 10) -> dict:
    return {"step_count": step, "iter_num": 2 * step, "tokens_seen": 1000 * step, "world_size": 2, "rng": [],
            "skipped_steps": 1, "data": {"global_batch_size": batch, "manifest": {"fingerprint": fingerprint}}}


def resumable(checkpoint: dict, **changes):
    settings = dict(global_batch_size=8, data_fingerprint="abc" * 10, train_data_dir="data/train", stop_at_step=0,
                    max_steps=10)
    return check_resumable(checkpoint, "out/iter-00000004-ckpt.pth", **{**settings, **changes})


def test_check_resumable_counters_and_refusals():
    assert resumable(ckpt()) == (4, 8, 4000, 1)
    with pytest.raises(InputError, match=r"--resume out/iter-00000004-ckpt.pth: not a checkpoint of this trainer "
                                         r"\(no rng\)"):
        resumable({k: v for k, v in ckpt().items() if k != "rng"})
    with pytest.raises(InputError, match="^--global_batch_size 16 differs from the checkpoint's 8"):
        resumable(ckpt(), global_batch_size=16)
    with pytest.raises(InputError, match=r"^--train_data_dir data/train: .* \(data fingerprint abcabcabcabc, now xyz\)"):
        resumable(ckpt(), data_fingerprint="xyz")
    with pytest.raises(InputError, match="^--stop_at_step 3: the checkpoint is already at step 4"):
        resumable(ckpt(), stop_at_step=3)
    assert resumable(ckpt(10), stop_at_step=3)[0] == 10  # a finished run: nothing to refuse


def test_resume_checkpoint_and_out_dir_policy(tmp_path):
    run = RunDir(tmp_path)
    assert resume_checkpoint("", tmp_path) is None and resume_checkpoint("auto", tmp_path) is None
    check_out_dir(tmp_path, "")  # empty: a fresh run may start
    for step in (2, 4, 6):
        torch.save({"step_count": step}, run.checkpoint(step))
    run.checkpoint(8).with_name(run.checkpoint(8).name + ".tmp").write_bytes(b"partial")
    assert resume_checkpoint("auto", tmp_path) == run.checkpoint(6)
    assert resume_checkpoint(str(run.checkpoint(2)), tmp_path) == run.checkpoint(2)
    with pytest.raises(InputError, match=r"^--out_dir .*: holds checkpoints of an earlier run \(newest: "
                                         r"iter-00000006-ckpt.pth\)"):
        check_out_dir(tmp_path, "")
    with pytest.raises(InputError, match="^--resume .*nope.pth: no such checkpoint"):
        check_out_dir(tmp_path, str(tmp_path / "nope.pth"))
    run.checkpoint(4).write_bytes(b"PK not a zip")
    with pytest.raises(InputError, match=f"^--resume: {run.checkpoint(4)}: not a readable checkpoint archive"):
        resume_checkpoint(str(run.checkpoint(4)), tmp_path)

    logged = []
    set_aside_checkpoints_after(tmp_path, 2, logged.append)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "iter-00000002-ckpt.pth", "iter-00000004-ckpt.pth.abandoned", "iter-00000006-ckpt.pth.abandoned",
        "iter-00000008-ckpt.pth.tmp"]
    assert logged[0] == "Set aside iter-00000004-ckpt.pth (after the resumed step 2) as iter-00000004-ckpt.pth.abandoned"


# ------------------------------------------------------------------ atomic publish
def test_open_atomically_publishes_only_a_complete_file(tmp_path):
    target = tmp_path / "sub" / "records.json"
    with open_atomically(target, "w") as f:
        f.write("one")
    with pytest.raises(RuntimeError), open_atomically(target, "w") as f:
        f.write("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "one" and sorted(p.name for p in target.parent.iterdir()) == ["records.json"]


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_replace_path_and_roll_forward_after_a_kill_mid_swap(tmp_path, kind):
    def make(path, text):
        if kind == "dir":
            path.mkdir()
            (path / "data").write_text(text)
        else:
            path.write_text(text)

    def read(path):
        return (path / "data" if kind == "dir" else path).read_text()

    target = tmp_path / "iter-00000001-ckpt.pth"
    make(temporary_name(target), "first")
    replace_path(target, temporary_name(target))
    make(temporary_name(target), "second")
    replace_path(target, temporary_name(target))
    assert read(target) == "second" and sorted(os.listdir(tmp_path)) == [target.name]
    # A kill after moving the old one aside and before the new one arrived: the old one goes back.
    target.rename(target.with_name(target.name + ".old"))
    make(temporary_name(target), "partial")
    roll_forward(target)
    assert read(target) == "second" and sorted(os.listdir(tmp_path)) == [target.name]


def test_point_symlink_repoints_in_one_rename(tmp_path):
    link = tmp_path / "current"
    assert point_symlink(link, "versions/a") is True
    assert point_symlink(link, "versions/a") is False
    assert point_symlink(link, "versions/b") is True
    assert os.readlink(link) == "versions/b" and sorted(os.listdir(tmp_path)) == ["current"]


def test_resume_says_how_the_lr_schedule_changes():
    """Resuming with another --max_steps re-stretches the cosine decay: the run says so, with the step and the rates."""
    saved = dict(learning_rate=3e-3, min_lr=3e-4, warmup_steps=10, max_steps=100, lr_schedule="cosine",
                 decay_fraction=0.2, seed=1)
    assert LRSchedule.describe_change(saved, saved, 40) is None  # same schedule: nothing to say
    longer = {**saved, "max_steps": 200}
    before, after = LRSchedule(3e-3, 3e-4, 10, 100)(40), LRSchedule(3e-3, 3e-4, 10, 200)(40)
    assert after > before  # a longer decay: a higher rate at the same step
    assert LRSchedule.describe_change(saved, longer, 40) == (
        f"The LR schedule changes from step 40 on: --max_steps 100 -> 200 (learning rate at step 40: "
        f"{before:.3g} -> {after:.3g})")


# ------------------------------------------------------------------ run records
class Killed(BaseException):
    """Stands for a SIGKILL: nothing after it runs (BaseException: no `except Exception` catches it)."""


def logged_run(run: Path, steps: int) -> list[dict]:
    """metrics.jsonl/.csv of a run that logged `steps` steps (and a baseline validation at step 0)."""
    log = MetricsLog(run, resume_step=None, enabled=True, log=lambda m: None)
    records = [{"iter": 0, "step": 0, "val_loss": 9.5}] + [
        {"iter": 2 * s, "step": s, "loss": 10.0 - s / 7, "lr": 1e-3, "tokens": 100 * s} for s in range(1, steps + 1)]
    for record in records:
        log.write(record)
    return records


@pytest.mark.parametrize("operations_before_kill", [1, 2, 3, 4])
def test_replacing_run_records_killed_at_any_point_loses_nothing(tmp_path, monkeypatch, operations_before_kill):
    """A resume from step 3 replaces the records of steps 4-6; it is killed after its n-th file operation, and the
    next start (resuming from step 3 again) must end with records 0-3 exactly once, in both files, and the replaced
    ones kept aside."""
    import lit_gpt.metrics_log as metrics_log

    records = logged_run(tmp_path, 6)
    original = (tmp_path / "metrics.jsonl").read_bytes()
    done = []

    def counted(operation):
        def run(*args, **kwargs):
            result = operation(*args, **kwargs)
            done.append(operation)
            if len(done) == operations_before_kill:
                raise Killed
            return result
        return run

    for name in ("set_aside", "keep_aside", "write_atomically"):  # whichever the module replaces files with
        if hasattr(metrics_log, name):
            monkeypatch.setattr(metrics_log, name, counted(getattr(metrics_log, name)))
    with pytest.raises(Killed):
        MetricsLog(tmp_path, resume_step=3, enabled=True, log=lambda m: None)
    monkeypatch.undo()
    log = MetricsLog(tmp_path, resume_step=3, enabled=True, log=lambda m: None)
    log.write({"iter": 8, "step": 4, "loss": 1.5})
    expected = records[:4] + [{"iter": 8, "step": 4, "loss": 1.5}]
    assert read_metrics(tmp_path / "metrics.jsonl") == (expected, False)
    with open(tmp_path / "metrics.csv", newline="") as f:
        assert [int(row["step"]) for row in csv.DictReader(f)] == [0, 1, 2, 3, 4]
    assert (tmp_path / "metrics.jsonl.replaced").read_bytes() == original
    assert not (tmp_path / "metrics.jsonl.replaced-2").exists()  # kept once, not once per attempt
