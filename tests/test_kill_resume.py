"""SIGKILL a training run at a step, inside a checkpoint write, inside the replacement of its run records and between
the last checkpoint and the final validation, on 1 rank (full checkpoints) and on 2 ranks (FSDP,
sharded checkpoints); `--resume auto` after each kill must end with exactly the losses of an uninterrupted run."""
import csv
import os
import signal
import subprocess
import sys

import pytest
from conftest import ROOT
from test_trainer import metrics, train, train_losses, trainer_args

STEPS = 8
# Every rank of the run is in one process group (the test starts it as a new session): killing the group is what a
# node failure or `scancel -s KILL` does to all ranks at once.
KILLER = """
import os, runpy, signal, sys
kind, at = os.environ["KILL_AT"].split(":")
at = int(at)

def die():
    os.killpg(os.getpgrp(), signal.SIGKILL)

if kind == "step":  # right after optimizer step `at` (the datapoint log records each step after its update)
    import lit_gpt.datapoints as datapoints
    record = datapoints.DatapointLogger.record
    def killing_record(self, step, sample_index):
        record(self, step, sample_index)
        if step + 1 == at:
            die()
    datapoints.DatapointLogger.record = killing_record
elif kind == "records":  # inside the replacement of the run records on resume, after its `at`-th file operation
    import lit_gpt.metrics_log as metrics_log
    done = []
    def counted(operation):
        def run(*args, **kwargs):
            result = operation(*args, **kwargs)
            done.append(operation)
            if len(done) == at:
                die()
            return result
        return run
    for name in ("set_aside", "keep_aside", "write_atomically"):  # whichever the module replaces files with
        if hasattr(metrics_log, name):
            setattr(metrics_log, name, counted(getattr(metrics_log, name)))
elif kind == "saved":  # right after the checkpoint of step `at` is complete (on rank 0, which publishes it)
    import lit_gpt.checkpoint.save as checkpoint_save
    import torch.distributed as dist
    real_save_checkpoint = checkpoint_save.save_checkpoint
    def save_checkpoint(path, *args, **kwargs):
        real_save_checkpoint(path, *args, **kwargs)
        if f"iter-{at:08d}-ckpt.pth" in str(path) and not (dist.is_initialized() and dist.get_rank()):
            die()
    checkpoint_save.save_checkpoint = save_checkpoint
else:  # while the checkpoint of step `at` is being written: part of it is on disk
    import lit_gpt.checkpoint.save as checkpoint_save
    import torch
    name = f"iter-{at:08d}-ckpt.pth"
    real_save, real_dcp_save = torch.save, checkpoint_save.dcp.save
    def save(obj, f, *args, **kwargs):
        if name in str(f):
            with open(f, "wb") as handle:
                handle.write(b"partial checkpoint bytes")
            die()
        return real_save(obj, f, *args, **kwargs)
    def dcp_save(state, checkpoint_id=None, **kwargs):
        if name in str(checkpoint_id):
            real_dcp_save(state, checkpoint_id=checkpoint_id, **kwargs)  # the shards, but not the metadata file
            die()
        return real_dcp_save(state, checkpoint_id=checkpoint_id, **kwargs)
    torch.save, checkpoint_save.dcp.save = save, dcp_save
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

LAYOUTS = {"one_rank_full": dict(devices=1, strategy="auto", state_dict_type="full"),
           # the synchronous save, which the hooks above reach (a kill mid async write: test_async_checkpoint.py)
           "two_ranks_fsdp_sharded": dict(devices=2, strategy="fsdp", state_dict_type="sharded",
                                          async_checkpoint="false")}


def killed_run(prepared_data, out_dir, wrapper, kill_at: str, **overrides) -> subprocess.CompletedProcess:
    args = trainer_args(prepared_data, out_dir, **overrides)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KILL_AT": kill_at}
    result = subprocess.run([sys.executable, str(wrapper), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600, start_new_session=True)
    assert result.returncode == -signal.SIGKILL, (kill_at, result.stdout[-2000:], result.stderr[-2000:])
    return result


def records(out_dir) -> list[dict]:
    """metrics.jsonl without the fields that depend on timing."""
    timing = {"time", "tokens_per_sec", "tokens_per_sec_smoothed", "mfu", "memory_gb", "goodput"}
    return [{k: v for k, v in r.items() if k not in timing} for r in metrics(out_dir)]


def csv_rows(out_dir) -> list[tuple]:
    with open(out_dir / "metrics.csv", newline="") as f:
        return [(int(row["step"]), row["loss"], row["val_loss"]) for row in csv.DictReader(f)]


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_killed_runs_resume_to_the_uninterrupted_losses(prepared_data, tmp_path, layout):
    wrapper = tmp_path / "killer.py"
    wrapper.write_text(KILLER)
    common = dict(max_steps=STEPS, save_interval=2, val_data_dir=prepared_data["val"], eval_iters=2, **LAYOUTS[layout])
    train(prepared_data, tmp_path / "reference", **common)
    run = tmp_path / "run"
    killed_run(prepared_data, run, wrapper, "step:4", **common)  # checkpoint 2 written, step 3 recorded, 4 lost
    # inside the replacement of the records after step 2: after its first file operation, then after its second
    killed_run(prepared_data, run, wrapper, "records:1", resume="auto", **common)
    killed_run(prepared_data, run, wrapper, "records:2", resume="auto", **common)
    killed_run(prepared_data, run, wrapper, "save:4", resume="auto", **common)  # dies writing checkpoint 4
    assert not (run / "iter-00000004-ckpt.pth").exists()
    killed_run(prepared_data, run, wrapper, "step:7", resume="auto", **common)  # checkpoint 6 written
    # the last checkpoint is complete, the final validation not yet computed
    out = killed_run(prepared_data, run, wrapper, f"saved:{STEPS}", resume="auto", **common)
    assert f"Resumed from {run / 'iter-00000006-ckpt.pth'}" in out.stdout
    out = train(prepared_data, run, resume="auto", **common)
    assert f"Resumed from {run / f'iter-{STEPS:08d}-ckpt.pth'}" in out.stdout and "final records are missing" in out.stdout
    reference, resumed = train_losses(tmp_path / "reference"), train_losses(run)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    assert resumed == reference  # exactly: same data position, RNG, optimizer state and reduction order
    # every record once, nothing lost, the final validation included: as the uninterrupted run wrote them
    assert [r["step"] for r in records(run)] == [0, *range(1, STEPS + 1), STEPS]
    assert records(run) == records(tmp_path / "reference")
    assert csv_rows(run) == csv_rows(tmp_path / "reference")
    again = train(prepared_data, run, resume="auto", **common)
    assert "nothing to train" in again.stdout and records(run) == records(tmp_path / "reference")
