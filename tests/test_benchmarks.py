"""Benchmark scores of checkpoints: evaluate.py --tasks (with a stand-in lm-eval adapter), its records beside the run's
metrics (merged by step, set aside with the checkpoints a resume abandons, even while a job is writing), the sbatch
submission (a failure is a warning), the Slurm job script, and the plot and summary that show them."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lm_eval_stand_in
import numpy as np
import pytest
from conftest import ROOT
from hf_helpers import random_state, small_config, write_run_dir

from lit_gpt import benchmarks, slurm_eval
from lit_gpt.benchmarks import (
    curves,
    latest_scores,
    make_record,
    open_record_dir,
    publish_record,
    read_benchmarks,
    set_aside_after,
)
from lit_gpt.checkpoint.load import load_gpt
from lit_gpt.tokenizer import Tokenizer
from scripts.evaluate import main as evaluate_main

JOB_SCRIPT = ROOT / "cluster" / "exec" / "evaluate.sbatch"


def _publish(run: Path, step: int, scores: dict, tokens: int | None = None, at: float | None = None) -> None:
    record = make_record(step, run / f"iter-{step:08d}-ckpt.pth", scores, tokens=tokens, limit=None)
    if at is not None:
        record["time"] = at
    fd = open_record_dir(run, f"iter-{step:08d}-ckpt.pth")
    try:
        publish_record(fd, record)
    finally:
        os.close(fd)


# ------------------------------------------------- records -----------------------------------------------------------
def test_records_merge_by_step_newest_score_wins(tmp_path):
    run = tmp_path / "run"
    _publish(run, 20, {"xnli_de": {"acc,none": 0.40, "acc_stderr,none": 0.01}}, tokens=2000, at=100.0)
    _publish(run, 10, {"xnli_de": {"acc,none": 0.35}, "arc_de": {"acc,none": 0.2, "acc_norm,none": 0.25}},
             tokens=1000, at=50.0)
    # a later job scores step 10 again on one of its tasks, and one more task
    _publish(run, 10, {"arc_de": {"acc,none": 0.21, "acc_norm,none": 0.27, "note": "N/A"},
                       "lambada_openai_mt_de": {"perplexity,none": 80.0, "acc,none": 0.1}}, tokens=1000, at=60.0)
    (run / "evals" / "iter-00000010-ckpt.pth" / ".x.json.tmp").write_text("{")  # a write in progress
    (run / "evals" / "iter-00000010-ckpt.pth" / "broken.json").write_text("{")  # not ours
    (run / "evals" / "logs").mkdir()
    (run / "evals" / "logs" / "eval-7.out").write_text("job log")
    warnings = []
    records = read_benchmarks(run, log=warnings.append)
    assert len(warnings) == 1 and "broken.json" in warnings[0]
    assert [(r["step"], r["tokens"]) for r in records] == [(10, 1000), (20, 2000)]
    assert records[0]["scores"] == {"xnli_de": {"acc,none": 0.35}, "arc_de": {"acc,none": 0.21, "acc_norm,none": 0.27},
                                    "lambada_openai_mt_de": {"perplexity,none": 80.0, "acc,none": 0.1}}
    assert curves(records) == {"arc_de": ("acc_norm", [(10, 1000, 0.27)]),
                               "lambada_openai_mt_de": ("acc", [(10, 1000, 0.1)]),
                               "xnli_de": ("acc", [(10, 1000, 0.35), (20, 2000, 0.40)])}
    assert latest_scores(records) == {"arc_de": (10, "acc_norm", 0.27), "lambada_openai_mt_de": (10, "acc", 0.1),
                                      "xnli_de": (20, "acc", 0.40)}


def test_a_resume_sets_aside_the_scores_of_the_checkpoints_it_abandons(tmp_path):
    run = tmp_path / "run"
    for step in (10, 20, 30):
        _publish(run, step, {"xnli_de": {"acc": step / 100}})
    # A job of step 30 has opened its record directory (before loading the checkpoint) when the resume from step 10
    # renames it; its record follows the directory, it does not land under the new run's step 30.
    late_job = open_record_dir(run, "iter-00000030-ckpt.pth")
    messages = []
    set_aside_after(run, 10, messages.append)
    try:
        publish_record(late_job, make_record(30, run / "iter-00000030-ckpt.pth", {"arc_de": {"acc": 0.9}},
                                             tokens=None, limit=None))
    finally:
        os.close(late_job)
    assert len(messages) == 2 and "iter-00000020-ckpt.pth.abandoned" in messages[0]
    assert [r["step"] for r in read_benchmarks(run)] == [10]
    assert len(list((run / "evals" / "iter-00000030-ckpt.pth.abandoned").glob("*.json"))) == 2
    # the continuation's own checkpoint 30 is scored again and shown
    _publish(run, 30, {"xnli_de": {"acc": 0.5}})
    assert [(r["step"], r["scores"]) for r in read_benchmarks(run)] == [(10, {"xnli_de": {"acc": 0.1}}),
                                                                         (30, {"xnli_de": {"acc": 0.5}})]
    set_aside_after(run, 0, messages.append)  # a fresh run in the directory: nothing is its own
    assert read_benchmarks(run) == [] and (run / "evals" / "iter-00000030-ckpt.pth.abandoned-2").is_dir()


# ------------------------------------------------- evaluate.py --tasks ---------------------------------------------
@pytest.fixture
def checkpoint(tmp_path, tokenizer_dir):
    config = small_config(2)
    path = write_run_dir(tmp_path / "run", config, tokenizer_dir, random_state(config, seed=5), step=10)
    (path.parent / "hparams.json").write_text("{}")
    return path


@pytest.fixture
def stand_in(monkeypatch):
    monkeypatch.setattr("scripts.evaluate.lm_eval_adapter", lambda: lm_eval_stand_in)


def test_evaluate_tasks_records_the_scores_of_the_checkpoint(checkpoint, stand_in, capsys):
    run = checkpoint.parent
    assert evaluate_main(["--checkpoint", str(checkpoint), "--tasks", "stand_in_de,stand_in_de_2", "--limit", "3",
                          "--metrics_run", str(run)]) == 0
    printed = json.loads(capsys.readouterr().out)
    # independent reference: the adapter called on the checkpoint's model directly
    model, _, tokenizer_dir, _ = load_gpt(checkpoint)
    expected = lm_eval_stand_in.evaluate_tasks(model, Tokenizer(tokenizer_dir), ["stand_in_de", "stand_in_de_2"],
                                               limit=3)
    assert 0 < expected["stand_in_de"]["acc,none"] < 1
    assert printed["scores"] == expected
    (record,) = read_benchmarks(run)
    assert record["step"] == 10 and record["tokens"] == 10 * 4 * 2 * 128  # the checkpoint's tokens_seen
    assert record["scores"] == {task: {k: v for k, v in metrics.items() if k != "acc_stderr,none"}
                                for task, metrics in expected.items()}
    assert Path(printed["record"]).parent == run / "evals" / checkpoint.name


@pytest.mark.parametrize("flags, message", [
    (["--tasks", "stand_in_de,nope"], "--tasks: unknown task 'nope'"),
    (["--tasks", " , "], "--tasks ' , ': names no task"),
    ([], "nothing to evaluate"),
    (["--tasks", "stand_in_de", "--limit", "0"], "--limit 0"),
    (["--data_dir", "x", "--metrics_run", "RUN"], "--metrics_run records benchmark scores: give --tasks"),
    (["--tasks", "stand_in_de", "--metrics_run", "nowhere"], "--metrics_run nowhere: no such run directory"),
    (["--tasks", "stand_in_de", "--metrics_run", "RUN", "--checkpoint", "RUN/tokenizer"],
     "--checkpoint RUN/tokenizer: not a checkpoint name of the form iter-XXXXXXXX-ckpt.pth (--metrics_run"),
])
def test_evaluate_tasks_bad_flags_are_one_error_line(checkpoint, stand_in, capsys, flags, message):
    flags = [f.replace("RUN", str(checkpoint.parent)) for f in flags]
    assert evaluate_main(["--checkpoint", str(checkpoint), *flags]) == 2
    err = capsys.readouterr().err
    message = message.replace("RUN", str(checkpoint.parent))
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert not (checkpoint.parent / "evals").exists()


def test_evaluate_offline_without_the_dataset_is_one_error_line(checkpoint, stand_in, capsys):
    assert evaluate_main(["--checkpoint", str(checkpoint), "--tasks", "stand_in_offline",
                          "--metrics_run", str(checkpoint.parent)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --tasks: Couldn't reach 'org/stand_in_offline'") and "pre-fetch" in err
    assert err.count("\n") == 1 and read_benchmarks(checkpoint.parent) == []


def test_evaluate_missing_checkpoint(checkpoint, stand_in, capsys):
    gone = checkpoint.with_name("iter-00000020-ckpt.pth")
    argv = ["--checkpoint", str(gone), "--tasks", "stand_in_de", "--metrics_run", str(checkpoint.parent)]
    assert evaluate_main(argv) == 2  # a wrong path is an error ...
    assert "error: " in capsys.readouterr().err
    assert evaluate_main([*argv, "--missing_ok"]) == 0  # ... unless rotation may have deleted it (the Slurm job)
    assert "no longer exists (deleted by --keep_last_checkpoints rotation" in capsys.readouterr().err
    assert read_benchmarks(checkpoint.parent) == []


# ------------------------------------------------- submission -------------------------------------------------------
def _fake_sbatch(tmp_path: Path, body: str) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "sbatch").write_text(f"#!/bin/bash\n{body}\n")
    (bin_dir / "sbatch").chmod(0o755)
    return bin_dir


def test_submit_evaluation_runs_sbatch_outside_the_training_job(tmp_path, monkeypatch):
    calls = tmp_path / "calls"
    bin_dir = _fake_sbatch(tmp_path, f'printf "%s\\n" "$PWD" "$@" > {calls}\nenv > {calls}.env\necho "4711;local"')
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "99")  # the training job's
    monkeypatch.setenv("SLURM_CONF", "/etc/slurm/x.conf")
    run = tmp_path / "run"
    messages = []
    (tmp_path / "my_task").mkdir()
    monkeypatch.chdir(tmp_path)
    job = slurm_eval.submit_evaluation(run / "iter-00000010-ckpt.pth", "xnli_de,my_task", run, limit=50,
                                       batch_size=16, sbatch_args="--partition=gpu --comment='two words'",
                                       log=messages.append)
    assert job == "4711" and "Submitted Slurm job 4711" in messages[0]
    argv = calls.read_text().splitlines()
    assert argv == [str(ROOT), "--parsable", f"--output={run.resolve()}/evals/logs/eval-%j.out", "--partition=gpu",
                    "--comment=two words", str(JOB_SCRIPT), str(run.resolve() / "iter-00000010-ckpt.pth"),
                    f"xnli_de,{tmp_path.resolve() / 'my_task'}", "--metrics_run", str(run.resolve()),
                    "--limit", "50", "--batch_size", "16"]
    env = calls.with_suffix(".env").read_text().splitlines()
    assert "SLURM_CONF=/etc/slurm/x.conf" in env and not any(line.startswith("SLURM_JOB_ID=") for line in env)
    assert (run / "evals" / "logs").is_dir()


@pytest.mark.parametrize("body, reason", [
    ('echo "sbatch: error: invalid partition specified: gpu" >&2; exit 1', "invalid partition specified"),
    ("echo Submitted batch job", "Submitted batch job"),  # no job id
    (None, "sbatch is not on PATH"),
])
def test_a_failed_submission_is_a_warning(tmp_path, monkeypatch, body, reason):
    if body is None:
        monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    else:
        monkeypatch.setenv("PATH", f"{_fake_sbatch(tmp_path, body)}:{os.environ['PATH']}")
    messages = []
    assert slurm_eval.submit_evaluation(tmp_path / "iter-00000010-ckpt.pth", "xnli_de", tmp_path,
                                        log=messages.append) is None
    assert len(messages) == 1 and messages[0].startswith("warning: --eval_submit_slurm") and reason in messages[0]


def test_trainer_flags(tmp_path):
    from pretrain.tinyllama_fabric import parse_args

    with pytest.raises(Exception, match="--eval_submit_slurm scores each checkpoint on --eval_tasks"):
        parse_args(["--eval_submit_slurm"])
    with pytest.raises(Exception, match="--eval_sbatch_args"):
        parse_args(["--eval_tasks", "xnli_de", "--eval_sbatch_args", "--comment='open"])
    cfg, _, _ = parse_args(["--eval_submit_slurm", "--eval_tasks", "xnli_de,arc_de"])
    assert cfg.eval_submit_slurm and cfg.eval_tasks == "xnli_de,arc_de"


# ------------------------------------------------- the job script -------------------------------------------------
def _job(tmp_path: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """evaluate.sbatch without a container, its python a stub that prints its environment and arguments."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True, exist_ok=True)
    (repo / "scripts" / "evaluate.py").write_text("")
    stub = _fake_sbatch(tmp_path, 'echo "HF=$HF_DATASETS_OFFLINE,$HF_HUB_OFFLINE PP=$PYTHONPATH"; '
                                  'printf "%s\\n" "$@"').parent / "bin" / "sbatch"
    full_env = {"PATH": os.environ["PATH"], "LLAMMLEIN_NO_CONTAINER": "1", "PYTHON": str(stub),
                "SLURM_SUBMIT_DIR": str(repo), **(env or {})}
    return subprocess.run(["bash", str(JOB_SCRIPT), *args], env=full_env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)


def test_job_script_scores_into_the_checkpoints_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "hparams.json").write_text("{}")
    ckpt = run / "iter-00000010-ckpt.pth"
    ckpt.write_text("")
    result = _job(tmp_path, str(ckpt), "xnli_de,arc_de", "--limit", "5")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert f"HF=1,1 PP={tmp_path / 'repo'}" in lines
    start = lines.index("scripts/evaluate.py")
    assert lines[start:start + 11] == ["scripts/evaluate.py", "--checkpoint", str(ckpt), "--tasks", "xnli_de,arc_de",
                                       "--missing_ok", "--metrics_run", str(run), "--limit", "5",
                                       lines[start + 10]] and "exited with status 0" in lines[start + 10]
    # another run's records when asked; online when asked
    other = _job(tmp_path, str(ckpt), "xnli_de", "--metrics_run", str(tmp_path), env={"HF_DATASETS_OFFLINE": "0"})
    assert other.stdout.count("--metrics_run") == 1 and f"--metrics_run\n{tmp_path}\n" in other.stdout
    assert "HF=0,1" in other.stdout
    export = tmp_path / "hf"  # an export: its scores are only printed
    export.mkdir()
    printed = _job(tmp_path, str(export), "xnli_de")
    assert printed.returncode == 0 and "--missing_ok\n" in printed.stdout and "--metrics_run" not in printed.stdout


def test_job_script_in_the_container_binds_the_run_and_the_dataset_cache(tmp_path):
    run, cache = tmp_path / "run", tmp_path / "hf"
    run.mkdir()
    cache.mkdir()
    ckpt = run / "iter-00000010-ckpt.pth"
    ckpt.write_text("")
    (tmp_path / "img.sif").write_text("")
    bin_dir = _fake_sbatch(tmp_path, "")
    (bin_dir / "apptainer").write_text('#!/bin/bash\nprintf "%s\\n" "$@"\n')
    (bin_dir / "apptainer").chmod(0o755)
    result = _job(tmp_path, str(ckpt), "xnli_de", env={"LLAMMLEIN_NO_CONTAINER": "0", "HF_HOME": str(cache),
                                                       "LLAMMLEIN_IMAGE": str(tmp_path / "img.sif"),
                                                       "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert result.returncode == 0, result.stderr
    argv = result.stdout.splitlines()[1:]  # after the job's first log line
    assert argv[:2] == ["exec", "--nv"]
    binds = argv[argv.index("--bind") + 1].split(",")
    assert binds == [str((tmp_path / "repo").resolve()), str(run.resolve()), str(cache.resolve())]
    i = argv.index(str(tmp_path / "img.sif"))
    assert argv[i + 1:i + 4] == ["python", "scripts/evaluate.py", "--checkpoint"]


def test_job_script_of_a_deleted_checkpoint_warns_and_succeeds(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "hparams.json").write_text("{}")
    result = _job(tmp_path, str(run / "iter-00000010-ckpt.pth"), "xnli_de")
    assert result.returncode == 0 and "warning: CHECKPOINT" in result.stderr and "rotation" in result.stderr
    assert "scripts/evaluate.py" not in result.stdout
    typo = _job(tmp_path, str(tmp_path / "nowhere" / "iter-00000010-ckpt.pth"), "xnli_de")
    assert typo.returncode == 2 and "does not exist" in typo.stderr
    usage = _job(tmp_path, "only-one")
    assert usage.returncode == 2 and "CHECKPOINT and TASKS are required" in usage.stderr
    assert subprocess.run(["bash", "-n", str(JOB_SCRIPT)]).returncode == 0


# ------------------------------------------------- plot and summary ----------------------------------------------
def test_plot_and_summary_show_the_scores(tmp_path):
    from scripts.plot_run import build_figure, load_run

    run = tmp_path / "run"
    run.mkdir()
    train = [{"step": s, "loss": 8 - s / 10, "tokens": 100 * s, "tokens_per_sec": 1.0} for s in (10, 20, 30)]
    # scores of the live model, as the trainer logs them (lit_gpt.train_tasks); a job's record of step 10 replaces
    # its xnli_de
    in_training = [{"iter": 40, "step": 10, "eval/xnli_de/acc": 0.1, "eval/seconds": 2.0},
                   {"iter": 120, "step": 30, "eval/llammlein_de_mc/acc": 0.5, "eval/llammlein_de_mc/acc_norm": 0.6,
                    "eval/seconds": 2.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*train, *in_training]))
    _publish(run, 10, {"xnli_de": {"acc,none": 0.3}, "arc_de": {"acc_norm,none": 0.2},
                       "lambada_openai_mt_de": {"perplexity,none": 90.0}}, tokens=1000)
    _publish(run, 30, {"xnli_de": {"acc,none": 0.4}, "arc_de": {"acc_norm,none": 0.3}})  # tokens not recorded
    _publish(run, 20, {"xnli_de": {"acc,none": math.nan}}, tokens=2000)
    fig, axes = build_figure([load_run(run, "r")])

    def line(key, label):
        (found,) = [ln for ln in axes[key].get_lines() if ln.get_label() == label]
        return np.asarray(found.get_xdata(), float).tolist(), np.asarray(found.get_ydata(), float).tolist()

    x, y = line(("benchmark:acc", "step"), "r: xnli_de")
    assert x == [10, 20, 30]
    np.testing.assert_array_equal(y, [0.3, math.nan, 0.4])  # a score that is not a number is a gap
    assert line(("benchmark:acc", "tokens"), "r: xnli_de")[0] == [1000, 2000, 3000]  # 3000 from the training records
    assert line(("benchmark:acc_norm", "tokens"), "r: arc_de") == ([1000, 3000], [0.2, 0.3])
    assert line(("benchmark:acc_norm", "tokens"), "r: llammlein_de_mc") == ([3000], [0.6])
    assert line(("benchmark:perplexity", "step"), "r: lambada_openai_mt_de") == ([10], [90.0])
    # below the loss, above the learning rate panels
    rows = [key for key in axes if key[1] == "step"]
    assert rows[:4] == [("loss", "step"), ("benchmark:acc", "step"), ("benchmark:acc_norm", "step"),
                        ("benchmark:perplexity", "step")]

    result = subprocess.run([sys.executable, "scripts/summarize_run.py", str(run)], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-4:] == ["arc_de: acc_norm 0.3000 at step 30",
                                               "lambada_openai_mt_de: perplexity 90.0000 at step 10",
                                               "llammlein_de_mc: acc_norm 0.6000 at step 30",
                                               "xnli_de: acc 0.4000 at step 30"]


def test_main_metric_prefers_the_headline():
    assert benchmarks.main_metric({"acc,none": 0.1, "acc_norm,none": 0.2, "acc_norm_stderr,none": 0.01}) == \
        ("acc_norm", 0.2)
    assert benchmarks.main_metric({"bleu": 3.0, "chrf": 2.0}) == ("bleu", 3.0)
    assert benchmarks.main_metric({"acc_stderr,none": 0.1}) is None


@pytest.mark.slow
def test_readme_names_only_tasks_lm_eval_has():
    """The German tasks the README lists exist in the installed lm-eval's registry (15 s to build its index)."""
    import re

    from lm_eval.tasks import TaskManager

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Evaluation\n"):readme.index("\n## ", readme.index("## Evaluation\n") + 1)]
    rows = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
    listed = [name for row in rows for name in re.findall(r"`([^`]+)`", row)]
    assert len(listed) >= 15 and "belebele_deu_Latn" in listed
    known = set(TaskManager(include_path=[str(ROOT / "eval" / "tasks")]).all_tasks)
    assert [name for name in listed if name not in known] == []
    assert "truthfulqa_de" not in known  # what the README says is missing


@pytest.mark.slow
def test_the_trainer_sets_aside_the_scores_of_abandoned_checkpoints(prepared_data, tmp_path):
    from test_trainer import train

    out = tmp_path / "run"
    train(prepared_data, out, max_steps=4, save_interval=2)
    _publish(out, 2, {"xnli_de": {"acc": 0.2}}, tokens=100)
    _publish(out, 4, {"xnli_de": {"acc": 0.4}}, tokens=200)
    resumed = train(prepared_data, out, max_steps=4, save_interval=2, resume=out / "iter-00000002-ckpt.pth")
    assert "Set aside the benchmark scores of iter-00000004-ckpt.pth (after step 2)" in resumed.stdout
    assert (out / "iter-00000004-ckpt.pth.abandoned").is_file() and (out / "iter-00000004-ckpt.pth").is_file()
    assert read_benchmarks(out) == [{"step": 2, "tokens": 100, "scores": {"xnli_de": {"acc": 0.2}}}]
    assert list((out / "evals" / "iter-00000004-ckpt.pth.abandoned").glob("*.json"))
