"""The trainer's guarantees checked in this process, in seconds, for the fast tier (`pytest -m "not slow"`).

The slow tests check the same at full scale in separate processes (test_trainer.py, test_kill_resume.py,
test_distributed.py, test_slurm.py); the fast tier covers the other guarantees in place:
elastic order: test_packed_dataset.py::test_order_independent_of_world_size_and_workers;
leak-free split: test_prepare_data.py::test_split_is_by_id_disjoint_and_independent_of_workers;
verified export: test_hf_export.py::test_export_matches_transformers."""
import signal

import pytest
from test_trainer import metrics, samples_per_step, train_losses, trainer_args

from pretrain import tinyllama_fabric as trainer

STEPS = 4


def run_trainer(prepared_data, out_dir, **overrides) -> int:
    """`main` of the trainer on the micro model, in this process; its pre-emption handlers are undone afterwards."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        return trainer.main([str(a) for a in trainer_args(prepared_data, out_dir, **overrides)[1:]])
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def test_exact_resume_in_process(prepared_data, tmp_path, capsys):
    full, split = tmp_path / "full", tmp_path / "split"
    assert run_trainer(prepared_data, full, max_steps=STEPS) == 0
    assert run_trainer(prepared_data, split, max_steps=STEPS, stop_at_step=STEPS // 2) == 0
    assert sorted(train_losses(split)) == list(range(1, STEPS // 2 + 1))
    checkpoint = split / f"iter-{STEPS // 2:08d}-ckpt.pth"
    capsys.readouterr()
    assert run_trainer(prepared_data, split, max_steps=STEPS, resume=checkpoint) == 0
    assert "Resumed from" in capsys.readouterr().out
    assert [r["step"] for r in metrics(split) if "loss" in r] == list(range(1, STEPS + 1))  # each step once
    assert train_losses(split) == train_losses(full)  # bit for bit, in one process
    assert samples_per_step(split) == samples_per_step(full)
    assert sorted(samples_per_step(full)) == list(range(STEPS))


@pytest.mark.parametrize("overrides,flag", [
    (dict(global_batch_size=8, micro_batch_size=3), "--micro_batch_size"),  # the command line's own checks
    (dict(train_data_dir="does/not/exist"), "--train_data_dir"),  # checks of the inputs, after torch is imported
    (dict(init_from="TOKFILE"), "--init_from"),  # fails inside the launched run: nothing may stay behind
])
def test_bad_input_is_one_error_line_and_leaves_nothing_in_process(prepared_data, tmp_path, capsys, overrides, flag):
    overrides = {k: prepared_data["tokenizer"] / "tokenizer.model" if v == "TOKFILE" else v
                 for k, v in overrides.items()}
    out_dir = tmp_path / "out"
    try:
        code = run_trainer(prepared_data, out_dir, **overrides)
    except SystemExit as e:  # what the command line exits with
        code = e.code
    assert code == 2
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and flag in errors[0] and "Traceback" not in stderr, stderr
    assert not out_dir.exists()
