"""The Slurm job script on a real (one-node, localhost) Slurm cluster: ranks from Slurm, pre-emption, requeue, resume.

Starts munged, slurmctld and slurmd (cluster/slurm_local.py), submits cluster/exec/train_fabric.sh without a container
on CPU, sends the pre-emption warning (USR1) mid-run and checks that the job checkpointed, was requeued under the same
job id and finished with the same per-step losses as an uninterrupted run. Skips only where Slurm cannot be set up
(slurm-wlm/munge not installed: bash cluster/install_ci_deps.sh; not root).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "cluster"))
from slurm_local import LocalSlurm, missing_requirements  # noqa: E402

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
JOB_SCRIPT = ROOT / "cluster" / "exec" / "train_fabric.sh"
# A laptop-sized allocation instead of the script's 16 nodes x 4 H100 (command-line options beat #SBATCH lines).
CPU_ALLOCATION = ("--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gres=none", "--time=15")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env() -> dict:
    """This process's environment without Slurm variables (pytest itself may run inside a Slurm job)."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SRUN_", "SBATCH_"))}


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = missing_requirements()
    if reason:
        pytest.skip(reason)
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"), cpus=2)
    try:  # stop() also runs when start() fails half-way: no daemon may outlive the test
        cluster.start()
        yield cluster
    finally:
        cluster.stop()



def test_a_failed_start_in_a_with_block_leaves_no_daemon(tmp_path, monkeypatch):
    """`with LocalSlurm():` whose start fails half-way (here: slurmctld never answers) must stop munged again."""
    reason = missing_requirements()
    if reason:
        pytest.skip(reason)
    cluster = LocalSlurm(tmp_path / "c", cpus=1)
    real_wait = cluster._wait

    def wait(ready, timeout, what):
        if what != "munged socket":
            raise RuntimeError(f"simulated: {what} did not come up")
        real_wait(ready, timeout, what)

    monkeypatch.setattr(cluster, "_wait", wait)
    with pytest.raises(RuntimeError, match="simulated"):
        with cluster:
            pass
    assert cluster.procs["munged"].poll() is not None, "munged outlived the failed start"


def _wait_until(predicate, timeout: float, what: str, cluster: LocalSlurm, job_id: int, log: Path,
                poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if cluster.job_info(job_id).get("JobState") in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            break
        time.sleep(poll)
    info = cluster.job_info(job_id)
    text = log.read_text(errors="replace") if log.exists() else "(no job output)"
    raise AssertionError(f"timed out waiting for {what}; job {job_id} is {info.get('JobState')} "
                         f"({info.get('Reason')}):\n{text[-6000:]}\n{cluster.logs()}")


def _finished(cluster: LocalSlurm, job_id: int, log: Path, timeout: float) -> dict:
    info = _wait_until(lambda: (i := cluster.job_info(job_id)).get("JobState") in ("COMPLETED",) and i,
                       timeout, "the job to complete", cluster, job_id, log)
    assert info["ExitCode"] == "0:0", log.read_text()
    return info


# --------------------------------------------------------------------------------------------------------------------
# Harness: the job script and Slurm's signal/requeue mechanics, with a stand-in trainer (seconds, no model).
FAKE_TRAINER = r'''
import argparse, json, os, signal, subprocess, sys, time
from pathlib import Path
p = argparse.ArgumentParser()
p.add_argument("--out_dir"); p.add_argument("--resume"); p.add_argument("--max_steps", type=int, default=60)
args, rest = p.parse_known_args()
rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
out = Path(args.out_dir)
ckpt = out / "ckpt.json"
start = json.loads(ckpt.read_text())["step"] if ckpt.exists() and args.resume == "auto" else 0
stop = []
signal.signal(signal.SIGUSR1, lambda *_: stop.append("USR1"))
signal.signal(signal.SIGTERM, lambda *_: stop.append("TERM"))
(out / f"rank{rank}.ready").write_text("")
print(f"start world_size={world} rank={rank} restart={os.environ.get('SLURM_RESTART_COUNT', '0')} step={start} "
      f"master={os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} argv={rest}", flush=True)
for step in range(start, args.max_steps):
    time.sleep(0.2)
    if rank == 0:
        with open(out / "steps.log", "a") as f:
            f.write(f"{step + 1}\n")
    if stop:
        if rank == 0:
            ckpt.write_text(json.dumps({"step": step + 1}))
            print(f"signal {stop[0]} at step {step + 1}: saved, requeueing", flush=True)
            subprocess.run(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]], check=False)
        sys.exit(0)
print(f"done rank={rank} steps={args.max_steps}", flush=True)
'''


def test_job_script_signal_requeue_mechanics(slurm: LocalSlurm, tmp_path: Path):
    """USR1 reaches every task; the job requeues itself, keeps its id and log, and restarts with --resume auto."""
    repo = tmp_path / "repo"
    (repo / "pretrain").mkdir(parents=True)
    (repo / "pretrain" / "tinyllama_fabric.py").write_text(FAKE_TRAINER)
    out = tmp_path / "out"
    env = {**_clean_env(), "LLAMMLEIN_ROOT": str(repo), "LLAMMLEIN_NO_CONTAINER": "1", "PYTHON": sys.executable,
           "OUT_DIR": str(out), "MODEL_NAME": "micro", "MASTER_PORT": str(_free_port())}
    job = slurm.sbatch(*CPU_ALLOCATION, f"--output={tmp_path}/job-%j.out", str(JOB_SCRIPT), "--max_steps", "60",
                       "--extra_flag", "x", cwd=repo, env=env)
    log = tmp_path / f"job-{job}.out"
    steps = out / "steps.log"
    _wait_until(lambda: all((out / f"rank{r}.ready").exists() for r in (0, 1)) and steps.exists()
                and len(steps.read_text().split()) >= 3, 60, "both tasks to run", slurm, job, log)
    subprocess.run(["scancel", "--signal=USR1", str(job)], env=slurm.env, check=True, timeout=30)
    info = _finished(slurm, job, log, timeout=120)

    text = log.read_text()
    assert int(info["Restarts"]) == 1, text
    starts = [line for line in text.splitlines() if line.startswith("start ")]
    assert len(starts) == 4, text  # two tasks, two runs
    assert {s.split()[2] for s in starts} == {"rank=0", "rank=1"}
    assert all("world_size=2" in s and "master=localhost:" in s for s in starts)
    assert all("--resume" not in s and "'--extra_flag', 'x'" in s for s in starts)  # script args reach the trainer
    saved = json.loads((out / "ckpt.json").read_text())["step"]
    assert 3 <= saved < 60
    assert sum(f"restart=1 step={saved}" in s for s in starts) == 2, text  # both ranks resumed from the save
    assert "done rank=0 steps=60" in text and "restart 1" in text
    logged = [int(x) for x in steps.read_text().split()]
    assert logged == list(range(1, saved + 1)) + list(range(saved + 1, 61)), "steps lost or repeated"


# --------------------------------------------------------------------------------------------------------------------
# The real trainer: Fabric ranks from Slurm, checkpoint on USR1, requeue, resume, identical losses.
MAX_STEPS = 20  # ~0.1-0.3 s each here: the pre-emption signal lands after a few steps, well before the end
TRAIN_ARGS = ("--accelerator", "cpu", "--strategy", "ddp", "--precision", "32-true", "--global_batch_size", "32",
              "--micro_batch_size", "2", "--max_steps", str(MAX_STEPS), "--save_interval", "5", "--log_interval", "1",
              "--eval_interval", "0", "--seed", "42", "--num_workers", "0",
              # A real learning rate: a resume that lost optimizer state would show in the losses.
              "--learning_rate", "3e-3", "--min_lr", "3e-4", "--warmup_steps", "2")


def _losses(out_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in records if r.get("loss") is not None]
    steps = [r["step"] for r in train]
    assert len(steps) == len(set(steps)), f"steps logged twice in {out_dir}/metrics.jsonl: {steps}"
    return {r["step"]: r["loss"] for r in train}


def _data(prepared_data) -> dict:
    return dict(MODEL_NAME="micro", TRAIN_DATA_DIR=str(prepared_data["train"]), VAL_DATA_DIR=str(prepared_data["val"]),
                TOKENIZER_PATH=str(prepared_data["tokenizer"]))


@pytest.fixture(scope="module")
def reference_losses(prepared_data, tmp_path_factory) -> dict[int, float]:
    """The same configuration as a plain 2-process run (Fabric launches the ranks), never interrupted."""
    data = _data(prepared_data)
    ref = tmp_path_factory.mktemp("reference")
    result = subprocess.run(
        [sys.executable, "pretrain/tinyllama_fabric.py", "--model_name", "micro", "--out_dir", str(ref),
         "--train_data_dir", data["TRAIN_DATA_DIR"], "--val_data_dir", data["VAL_DATA_DIR"],
         "--tokenizer_path", data["TOKENIZER_PATH"], "--devices", "2", *TRAIN_ARGS],
        cwd=ROOT, env={**_clean_env(), "OMP_NUM_THREADS": "1", "MASTER_PORT": str(_free_port())},
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    reference = _losses(ref)
    assert sorted(reference) == list(range(1, MAX_STEPS + 1))
    return reference


def _assert_same_losses(out: Path, reference: dict[int, float]) -> None:
    losses = _losses(out)
    assert sorted(losses) == list(range(1, MAX_STEPS + 1)), f"steps missing or extra: {sorted(losses)}"
    for step, loss in reference.items():
        assert abs(losses[step] - loss) <= 1e-5, f"step {step}: {losses[step]} (Slurm, resumed) vs {loss} (reference)"


def test_pretrain_under_slurm_preempt_requeue_resume(slurm: LocalSlurm, prepared_data, reference_losses,
                                                      tmp_path: Path):
    data = _data(prepared_data)
    out = tmp_path / "slurm_out"
    env = {**_clean_env(), **data, "LLAMMLEIN_NO_CONTAINER": "1", "PYTHON": sys.executable, "OUT_DIR": str(out),
           "MASTER_PORT": str(_free_port()), "LLAMMLEIN_NETWORK": "socket"}
    job = slurm.sbatch(*CPU_ALLOCATION, f"--output={tmp_path}/job-%j.out", str(JOB_SCRIPT), *TRAIN_ARGS,
                       cwd=ROOT, env=env)
    log = tmp_path / f"job-{job}.out"
    metrics = out / "metrics.jsonl"

    # Pre-empt once training runs (the handler is installed before the first step) and well before the end.
    def training_started() -> bool:
        return metrics.exists() and any('"loss"' in line for line in metrics.read_text().splitlines())

    _wait_until(training_started, 300, "the first training step", slurm, job, log, poll=0.05)
    subprocess.run(["scancel", "--signal=USR1", str(job)], env=slurm.env, check=True, timeout=30)
    info = _finished(slurm, job, log, timeout=600)
    text = log.read_text()

    # Fabric took its ranks from Slurm, in both runs of the job.
    hparams = json.loads((out / "hparams.json").read_text())
    assert hparams["world_size"] == 2 and hparams["launched_by"] == "slurm", hparams
    assert text.count("world_size=2 (slurm)") == 2, text
    for rank in (0, 1):  # each srun task became the Fabric rank Slurm gave it (SLURM_PROCID), in both runs
        assert text.count(f"GLOBAL_RANK: {rank}, MEMBER: {rank + 1}/2") == 2, text
    # Pre-empted mid-run, checkpointed, requeued under the same id, resumed from that checkpoint.
    assert "Pre-empted: requeueing Slurm job" in text, text
    assert int(info["Restarts"]) == 1, info
    assert "restart 1" in text
    resumed = [line for line in text.splitlines() if line.startswith("Resumed from ")]
    assert len(resumed) == 1, text
    resume_step = int(resumed[0].split(" at step ")[1].split()[0])
    assert 1 <= resume_step < MAX_STEPS, f"the signal came too late to interrupt training (step {resume_step}):\n{text}"
    assert f"iter-{resume_step:08d}-ckpt.pth" in resumed[0] and "(written by 2 ranks, now 2)" in resumed[0]
    # ... and the interruption changed nothing: the same loss at every step as the uninterrupted run.
    _assert_same_losses(out, reference_losses)


HANG_STEP = 8  # after the checkpoint of step 5 (--save_interval 5): the requeued job resumes from it


def test_a_hang_under_slurm_excludes_the_node_and_the_requeued_job_resumes(slurm: LocalSlurm, prepared_data,
                                                                          reference_losses, tmp_path: Path):
    """Rank 1 sleeps inside step 8 (test hook, first run only): the trainer reports the hang naming its node, the job
    script adds the node to the job's ExcNodeList and requeues. The cluster's only node is then excluded, so the
    job cannot start again until the test clears the exclusion; then it resumes by itself to the reference losses."""
    out = tmp_path / "slurm_out"
    env = {**_clean_env(), **_data(prepared_data), "LLAMMLEIN_NO_CONTAINER": "1", "PYTHON": sys.executable,
           "OUT_DIR": str(out), "MASTER_PORT": str(_free_port()), "LLAMMLEIN_NETWORK": "socket",
           "LLAMMLEIN_TEST_SLOW_RANK": f"1:{HANG_STEP}:300"}
    job = slurm.sbatch(*CPU_ALLOCATION, f"--output={tmp_path}/job-%j.out", str(JOB_SCRIPT), *TRAIN_ARGS,
                       "--hang_min_s", "6", cwd=ROOT, env=env)
    log = tmp_path / f"job-{job}.out"
    info = _wait_until(lambda: "localhost" in (i := slurm.job_info(job)).get("ExcNodeList", "") and i, 400,
                       "the hung node to be excluded", slurm, job, log)
    assert info["JobState"] == "PENDING" and int(info["Restarts"]) == 1, info
    report = json.loads((out / f"hang-{HANG_STEP}" / "report.json").read_text())
    assert [(e["rank"], e["node"], e["phase"]) for e in report["not_arrived"]] == [(1, "localhost", "computing")]
    assert {p.name for p in (out / f"hang-{HANG_STEP}").glob("rank-*.txt")} == {"rank-0.txt", "rank-1.txt"}
    text = log.read_text()
    assert f"step {HANG_STEP} hung" in text and "requeueing without node(s) localhost" in text, text

    subprocess.run(["scontrol", "update", f"JobId={job}", "ExcNodeList="], env=slurm.env, check=True, timeout=30)
    info = _finished(slurm, job, log, timeout=600)
    text = log.read_text()
    assert int(info["Restarts"]) == 1 and info["ExcNodeList"] == "(null)", info
    resumed = [line for line in text.splitlines() if line.startswith("Resumed from ")]
    assert len(resumed) == 1 and " at step 5 " in resumed[0], text
    _assert_same_losses(out, reference_losses)


# --------------------------------------------------------------------------------------------------------------------
# --eval_submit_slurm: the trainer submits cluster/exec/evaluate.sbatch after each checkpoint; the jobs' scores land in
# the run's records under the checkpoints' steps, equal to lm-eval on the same checkpoint in this process.
EVAL_LIMIT = 4  # items per task: seconds per job


def test_trainer_submits_evaluation_jobs(slurm: LocalSlurm, prepared_data, tmp_path: Path):
    from lit_gpt.benchmarks import read_benchmarks
    from lit_gpt.checkpoint.load import load_gpt
    from lit_gpt.lm_eval_adapter import evaluate_tasks
    from lit_gpt.tokenizer import Tokenizer

    out = tmp_path / "run"
    env = {**_clean_env(), "SLURM_CONF": str(slurm.conf), "LLAMMLEIN_NO_CONTAINER": "1", "PYTHON": sys.executable,
           "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "pretrain/tinyllama_fabric.py", "--model_name", "micro", "--out_dir", str(out),
         "--train_data_dir", str(prepared_data["train"]), "--val_data_dir", "", "--tokenizer_path",
         str(prepared_data["tokenizer"]), "--accelerator", "cpu", "--devices", "1", "--strategy", "auto",
         "--precision", "32-true", "--global_batch_size", "8", "--micro_batch_size", "4", "--max_steps", "6",
         "--save_interval", "3", "--keep_last_checkpoints", "0", "--log_interval", "1", "--num_workers", "0",
         "--eval_submit_slurm", "--eval_tasks", "llammlein_de", "--eval_limit", str(EVAL_LIMIT),
         # the local node: no GPU, 2 CPUs
         "--eval_sbatch_args", "--gres=none --cpus-per-task=1 --time=10"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    jobs = [int(line.split()[3].rstrip(":")) for line in result.stdout.splitlines()
            if line.startswith("Submitted Slurm job ")]
    assert len(jobs) == 2, result.stdout
    for job in jobs:
        _finished(slurm, job, out / "evals" / "logs" / f"eval-{job}.out", timeout=300)

    records = read_benchmarks(out)
    assert [r["step"] for r in records] == [3, 6]
    for record in records:
        # the same checkpoint scored here, in this process
        model, _, tokenizer_dir, meta = load_gpt(out / f"iter-{record['step']:08d}-ckpt.pth")
        expected = evaluate_tasks(model, Tokenizer(tokenizer_dir), ["llammlein_de"], limit=EVAL_LIMIT)
        assert record["tokens"] == meta["tokens_seen"]
        assert set(record["scores"]) == set(expected) and "llammlein_de_ppl" in expected
        for task, metrics in expected.items():
            assert set(record["scores"][task]) == set(metrics)
            for metric, value in metrics.items():
                assert record["scores"][task][metric] == pytest.approx(value, rel=1e-6), (task, metric)
    assert records[0]["scores"] != records[1]["scores"]  # two different checkpoints were scored
    # the trainer scored nothing itself, and its own records are untouched
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6] and not any("eval/" in k for r in steps for k in r)
