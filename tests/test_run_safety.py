"""Nothing lost, nothing silently wrong (trainer side): a refused resume leaves out_dir as it was, replaced run
records are set aside rather than truncated, a torn metrics line does not block resuming, a finished run started again
adds nothing, flag errors come before torch is imported. Every run is a real trainer subprocess."""
import hashlib
import json
from pathlib import Path

import pytest
from conftest import run_script
from test_trainer import STEPS, metrics, train, train_losses, trainer_args


def snapshot(directory: Path) -> dict[str, str]:
    """Every file under `directory` (relative path -> sha256 of its bytes)."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(prepared_data, tmp_path_factory) -> Path:
    """A finished run of 6 steps with checkpoints at 2, 4 and 6 and validation at the end."""
    out = tmp_path_factory.mktemp("finished")
    train(prepared_data, out, max_steps=6, save_interval=2, val_data_dir=prepared_data["val"], eval_iters=1)
    return out


def copy_run(run: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(run, to)
    return to


@pytest.mark.slow
def test_refused_resume_leaves_the_run_untouched(prepared_data, finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path / "run")
    before = snapshot(run)
    # Other training data than the checkpoint was trained on (here: the validation split).
    result = train(prepared_data, run, check=False, max_steps=6, save_interval=2,
                   train_data_dir=prepared_data["val"], resume=run / "iter-00000002-ckpt.pth")
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: --train_data_dir"), result.stderr[-2000:]
    assert snapshot(run) == before  # no checkpoint set aside, no record truncated, no run file rewritten


@pytest.mark.slow
def test_replaced_metrics_are_set_aside_whole(prepared_data, finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path / "run")
    original = (run / "metrics.jsonl").read_bytes()
    out = train(prepared_data, run, max_steps=6, save_interval=2, learning_rate=1e-3,
                resume=run / "iter-00000002-ckpt.pth")
    assert "Set aside metrics.jsonl" in out.stdout
    assert (run / "metrics.jsonl.replaced").read_bytes() == original  # every replaced record kept, byte for byte
    old = [json.loads(line) for line in original.decode().splitlines()]
    new = metrics(run)
    assert [r for r in new if r["step"] <= 2] == [r for r in old if r["step"] <= 2]
    assert [r["step"] for r in new if "loss" in r] == list(range(1, 7))
    # The datapoint log of the replaced steps is kept too.
    assert sorted(p.name for p in (run / "datapoints" / "replaced-at-00000002").iterdir())


@pytest.mark.slow
def test_torn_last_metrics_line_is_dropped_with_a_warning(prepared_data, tmp_path):
    reference = tmp_path / "reference"
    train(prepared_data, reference)
    run = tmp_path / "run"
    train(prepared_data, run, stop_at_step=3)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"iter": 8, "step": 4, "lo')  # a node died while appending
    out = train(prepared_data, run, resume="auto")
    assert "dropped a torn last line" in out.stdout
    assert train_losses(run) == pytest.approx(train_losses(reference), abs=1e-6)
    assert (run / "metrics.jsonl.replaced").read_text().endswith('"lo')  # the torn record is kept aside


@pytest.mark.slow
def test_a_finished_run_started_again_adds_nothing(prepared_data, finished_run, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = copy_run(finished_run, tmp_path / "run")
    before = snapshot(run)
    out = train(prepared_data, run, max_steps=6, save_interval=2, val_data_dir=prepared_data["val"], eval_iters=1,
                resume="auto")
    assert "nothing to train" in out.stdout
    assert snapshot(run) == before  # e.g. no second final validation record
    assert sum("val_loss" in r and r["step"] == 6 for r in metrics(run)) == 1
    # The last events of the finished run reached the disk (the logger was flushed and closed).
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert max(e.step for e in events.Scalars("loss")) == 6
    assert max(e.step for e in events.Scalars("val_loss")) == 6


def test_flags_are_checked_before_torch_is_imported(prepared_data, tmp_path):
    # Importing torch or Lightning fails in this wrapper: --help, --print_config and flag errors must not need them.
    wrapper = tmp_path / "no_torch.py"
    wrapper.write_text(
        "import runpy, sys\n"
        "class NoTorch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'lightning'):\n"
        "            raise ImportError(f'{name} imported before the flags were checked')\n"
        "sys.meta_path.insert(0, NoTorch())\n"
        "sys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    base = trainer_args(prepared_data, tmp_path / "out")
    for extra, code, expected in ((["--learning_rate", "inf"], 2, "error: --learning_rate must be a finite number"),
                                  (["--block_size", "0"], 2, "error: --block_size must be > 0, got 0"),
                                  (["--help"], 0, "--warmup_steps INT"),
                                  (["--print_config"], 0, "max_steps: 5")):
        result = run_script(str(wrapper), *base, *extra, check=False)
        assert result.returncode == code, result.stderr[-2000:]
        assert expected in result.stdout + result.stderr
        assert "imported before the flags were checked" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_print_config_is_read_back_by_config(prepared_data, tmp_path):
    args = trainer_args(prepared_data, tmp_path / "out", n_layer=3, max_tokens=100_000)
    printed = run_script(*args, "--print_config").stdout
    (tmp_path / "run.yaml").write_text(printed)
    again = run_script(args[0], "--config", str(tmp_path / "run.yaml"), "--print_config").stdout
    assert again == printed
    values = __import__("yaml").safe_load(printed)
    # What was set, nothing the model name or max_tokens imply (n_embd is micro's, max_steps 98 follows from max_tokens).
    assert values["n_layer"] == 3 and values["max_tokens"] == 100_000 and values["max_steps"] == STEPS
    assert "n_embd" not in values and values["model_name"] == "micro"


def test_a_sharded_checkpoint_without_checksums_is_resumed_only_with_allow_unverified(prepared_data, tmp_path):
    run = tmp_path / "run"
    sharded = dict(max_steps=6, save_interval=2, strategy="auto", state_dict_type="sharded")
    train(prepared_data, run, stop_at_step=4, **sharded)
    (run / "iter-00000004-ckpt.pth" / "checksums.sha256").unlink()  # as an older version wrote it
    before = snapshot(run)
    refused = train(prepared_data, run, check=False, resume=run / "iter-00000004-ckpt.pth", **sharded)
    assert refused.returncode == 2, refused.stderr[-2000:]
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: --resume: {run / 'iter-00000004-ckpt.pth'}: has no checksums.sha256 to verify its "
                      f"bytes against (written by an older version, or the file was removed); pass "
                      f"--allow_unverified to use it unverified"], refused.stderr[-2000:]
    assert "Traceback" not in refused.stderr and snapshot(run) == before
    allowed = train(prepared_data, copy_run(run, tmp_path / "allowed"), resume="auto", allow_unverified=True,
                    **sharded)
    assert f"Resumed from {tmp_path / 'allowed' / 'iter-00000004-ckpt.pth'}" in allowed.stdout
    passed_over = train(prepared_data, run, resume="auto", **sharded)
    assert f"Resumed from {run / 'iter-00000002-ckpt.pth'}" in passed_over.stdout
    assert f"warning: passing over {run / 'iter-00000004-ckpt.pth'}: has no checksums.sha256" in passed_over.stderr


# ------------------------------------------------------------------ records that cannot be written (issue 22)
def run_with_injected_failure(data: dict, out: Path, setup: str, **overrides):
    """The trainer, in a process where `setup` (Python) has replaced a write primitive first."""
    wrapper = out.parent / f"{out.name}_wrapper.py"
    wrapper.write_text("import errno, os, runpy, sys\n" + setup
                       + "\nsys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name='__main__')\n")
    return run_script(str(wrapper), *trainer_args(data, out, **overrides), check=False)


def one_error(result) -> str:
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return errors[0]


METRICS_READ_ONLY_FROM_STEP_3 = """
import lit_gpt.metrics_log as metrics_log
appends = []
def open_or_refuse(path, mode='r', *args, **kwargs):
    if str(path).endswith('metrics.jsonl') and mode == 'a':
        appends.append(path)
        if len(appends) >= 3:  # made read-only after hparams.json was written and two steps were logged
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
    return open(path, mode, *args, **kwargs)
metrics_log.open = open_or_refuse
"""

TENSORBOARD_DISK_FULL_FROM_STEP_3 = """
from tensorboard.summary.writer import record_writer
real_write, writes = record_writer.RecordWriter.write, []
def write_or_full(self, data):
    writes.append(1)
    if len(writes) > 25:  # the file version, hparams and the scalars of about two steps reach the disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real_write(self, data)
record_writer.RecordWriter.write = write_or_full
"""


@pytest.mark.parametrize("setup,path,cause", [
    (METRICS_READ_ONLY_FROM_STEP_3, "metrics.jsonl", "Permission denied"),
    (TENSORBOARD_DISK_FULL_FROM_STEP_3, "tensorboard", "No space left on device"),
])
def test_a_record_that_cannot_be_written_stops_the_run_and_loses_nothing(prepared_data, tmp_path, setup, path,
                                                                           cause):
    reference = tmp_path / "reference"
    train(prepared_data, reference, max_steps=6, save_interval=2, logger="tensorboard,csv")
    out = tmp_path / "run"
    result = run_with_injected_failure(prepared_data, out, setup, max_steps=6, save_interval=2,
                                       logger="tensorboard,csv")
    assert result.returncode == 1, result.stderr[-3000:]
    error = one_error(result)
    assert f"{out / path}" in error and cause in error, error
    # No checkpoint after the lost records: resuming trains those steps again, and every record is there.
    checkpoints = sorted(p.name for p in out.glob("iter-*"))
    assert all(name < "iter-00000004" for name in checkpoints), checkpoints
    train(prepared_data, out, max_steps=6, save_interval=2, logger="tensorboard,csv", resume="auto")
    assert train_losses(out) == train_losses(reference)
    assert sorted(r["step"] for r in metrics(out)) == list(range(1, 7))


@pytest.mark.parametrize("async_checkpoint", ["false", "true"])
def test_a_full_disk_in_a_two_process_sharded_save_is_one_error(prepared_data, tmp_path, async_checkpoint):
    # rank 0 (the process the wrapper patches; Fabric starts rank 1 from the trainer itself) cannot write its shard
    setup = ("import torch.distributed.checkpoint.filesystem as fs\n"
             "real_write = fs._write_item\n"
             "def write_or_full(*args, **kwargs):\n"
             "    if 'iter-00000004' in str(getattr(args[1], 'name', '')):  # the stream of a shard file\n"
             "        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n"
             "    return real_write(*args, **kwargs)\n"
             "fs._write_item = write_or_full\n")
    out = tmp_path / "run"
    result = run_with_injected_failure(prepared_data, out, setup, max_steps=6, save_interval=2, devices=2,
                                       strategy="fsdp", state_dict_type="sharded", global_batch_size=8,
                                       async_checkpoint=async_checkpoint)
    assert result.returncode == 1, result.stderr[-3000:]
    error = one_error(result)
    assert "iter-00000004-ckpt.pth" in error and "no space left on device" in error.lower(), error
    assert sorted(p.name for p in out.glob("iter-*")) == ["iter-00000002-ckpt.pth"]
