"""Hang detection and the straggler report: the decisions in-process (fast), then real 2-rank CPU runs (slow): a rank
that sleeps inside a step is reported with its host and the run exits with the hang code; a rank slowed every step is
named as a straggler, a healthy run names nobody."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT
from test_trainer import metrics, trainer_args

from lit_gpt import watchdog
from lit_gpt.stragglers import StragglerReport, describe, name_stragglers, slowest_nodes
from lit_gpt.watchdog import HANG_EXIT_CODE, WARMUP_STEPS, StepWatch, hang_report, not_arrived, step_limit


# ------------------------------------------------- fast: the decisions -------------------------------------------
def test_step_limit_is_long_until_warm_then_factor_times_median_with_a_floor():
    assert step_limit([0.1] * (WARMUP_STEPS - 1), factor=10, floor_s=0.5, long_s=1800) == 1800
    assert step_limit([0.1, 0.2, 9.0], factor=10, floor_s=0.5, long_s=1800) == pytest.approx(2.0)  # median 0.2
    assert step_limit([0.01] * 5, factor=10, floor_s=0.5, long_s=1800) == 0.5  # the floor
    assert step_limit([600.0] * 5, factor=10, floor_s=0.5, long_s=1800) == 1800  # never beyond the group's timeout
    assert step_limit([0.1] * 5, factor=0, floor_s=0.5, long_s=1800) == 1800  # off


def _dump(step, phase, arrivals):
    return {"step": step, "phase": phase, "arrivals": arrivals}


def test_the_ranks_that_did_not_arrive_are_named():
    # Rank 1 computes (before the step's first collective) while rank 0 waits in it.
    assert not_arrived({0: _dump(7, "waiting", 1), 1: _dump(7, "computing", 0)}, 2) == [1]
    # A rank hung so hard that it wrote nothing counts as not arrived.
    assert not_arrived({0: _dump(7, "waiting", 1)}, 2) == [1]
    # Ranks 0 and 2 wait in the second collective: rank 1 passed the first one but computes still; rank 3 is silent.
    dumps = {0: _dump(7, "waiting", 2), 1: _dump(7, "computing", 1), 2: _dump(7, "waiting", 2)}
    assert not_arrived(dumps, 4) == [1, 3]
    # Nobody waits for anybody: nobody can be blamed but the silent ranks.
    assert not_arrived({0: _dump(7, "computing", 1), 1: _dump(7, "computing", 1)}, 2) == []
    report = hang_report(7, dumps, [("h0", "n0"), ("h1", "n1"), ("h2", "n2"), ("h3", "n3")], 12.0)
    assert [(e["rank"], e["host"], e["node"], e["phase"]) for e in report["not_arrived"]] == [
        (1, "h1", "n1", "computing"), (3, "h3", "n3", "no dump")]
    assert report["ranks"]["3"] == {"host": "h3", "phase": "no dump"} and report["step"] == 7
    line = watchdog.describe_hang(report, Path("out/hang-7"))
    assert "rank 1 on h1, rank 3 on h3" in line and f"code {HANG_EXIT_CODE}" in line and "\n" not in line


def test_watchdog_thread_dumps_reports_and_exits_with_the_hang_code(tmp_path, monkeypatch):
    """In-process: three quick steps, then one that waits in its collective far longer than 10x their median. The
    other rank (rank 1 of 2) writes nothing: the report names it after the (shortened) grace period."""
    monkeypatch.setattr(watchdog, "DUMP_GRACE_S", 0.5)
    exits, logged = [], []
    exited = threading.Event()
    watch = StepWatch(tmp_path, 0, [("host-a", "node-a"), ("host-b", "node-b")], factor=10, floor_s=0.3,
                      long_s=60, log=logged.append, exit_fn=lambda code: (exits.append(code), exited.set()))
    try:
        for step in range(1, WARMUP_STEPS + 1):
            watch.begin(step)
            time.sleep(0.01)
            watch.end()
        start = time.monotonic()
        watch.begin(4)
        with watch.collective():
            assert exited.wait(10), "the watchdog did not fire"
        fired_after = time.monotonic() - start
    finally:
        watch.close()
    assert exits == [HANG_EXIT_CODE]
    assert fired_after < 0.3 + 0.5 + 2.0  # the floor, the grace period, and slack for a busy machine
    report = json.loads((tmp_path / "hang-4" / "report.json").read_text())
    assert report["not_arrived"] == [{"rank": 1, "host": "host-b", "node": "node-b", "phase": "no dump"}]
    assert (tmp_path / "hang-4" / "exclude_nodes").read_text().strip() == "node-b"
    dump = (tmp_path / "hang-4" / "rank-0.txt").read_text()
    assert "phase: waiting\narrivals: 1\n" in dump and "host: host-a" in dump
    assert "test_watchdog_thread_dumps_reports_and_exits" in dump  # the stack of the thread that waits
    assert len(logged) == 1 and "rank 1 on host-b" in logged[0]


def test_rank_1_reports_when_rank_0_does_not(tmp_path, monkeypatch):
    """Rank 0 stuck too hard to run its watchdog (no dump, no report): rank 1 waits for the report, then writes it."""
    monkeypatch.setattr(watchdog, "DUMP_GRACE_S", 0.2)
    logged = []
    watch = StepWatch(tmp_path, 1, [("host-a", "node-a"), ("host-b", "node-b")], factor=0, floor_s=1, long_s=60,
                      log=logged.append)
    assert watch.on_hang({"step": 9, "phase": "waiting", "arrivals": 2}, 30.0, 20.0) == HANG_EXIT_CODE
    report = json.loads((tmp_path / "hang-9" / "report.json").read_text())
    assert report["not_arrived"] == [{"rank": 0, "host": "host-a", "node": "node-a", "phase": "no dump"}]
    assert report["ranks"]["1"] == {"host": "host-b", "phase": "waiting"}
    assert len(logged) == 1 and "rank 0 on host-a" in logged[0]
    # Any other rank only waits: one report, not one per rank.
    (tmp_path / "hang-9" / "report.json").unlink()
    other = StepWatch(tmp_path, 2, [("a", "a"), ("b", "b"), ("c", "c")], factor=0, floor_s=1, long_s=60,
                      log=logged.append)
    assert other.on_hang({"step": 9, "phase": "waiting", "arrivals": 2}, 30.0, 20.0) == HANG_EXIT_CODE
    assert not (tmp_path / "hang-9" / "report.json").exists() and len(logged) == 1


def test_a_step_within_the_limit_is_no_hang(tmp_path):
    fired = []
    watch = StepWatch(tmp_path, 0, [("h", "n")], factor=10, floor_s=0.3, long_s=60, exit_fn=fired.append)
    try:
        for step in range(1, WARMUP_STEPS + 3):
            watch.begin(step)
            with watch.collective():
                time.sleep(0.2)
            time.sleep(0.05)
            compute = watch.end()
    finally:
        watch.close()
    assert fired == [] and not list(tmp_path.iterdir())
    assert 0.05 <= compute < 0.2  # the time outside the collective only


def test_a_hang_asks_nccls_flight_recorder_for_its_dump_and_keeps_it(tmp_path, monkeypatch):
    """CUDA runs: the watchdog writes to the named pipe ProcessGroupNCCL polls (here a stand-in reader plays torch's
    part) and moves the dump it writes into the hang directory."""
    for name in ("TORCH_NCCL_TRACE_BUFFER_SIZE", "TORCH_NCCL_DUMP_ON_TIMEOUT", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE",
                 "TORCH_NCCL_DEBUG_INFO_PIPE_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TORCH_NCCL_TRACE_BUFFER_SIZE", "50")  # the user's setting is kept
    monkeypatch.setenv("SLURM_JOB_ID", "4711")
    monkeypatch.setattr(watchdog.tempfile, "gettempdir", lambda: str(tmp_path / "node-tmp"))
    watchdog.configure_nccl_flight_recorder()
    trace_dir = tmp_path / "node-tmp" / f"{watchdog.NCCL_TRACE_DIR}-4711"
    assert os.environ["TORCH_NCCL_TRACE_BUFFER_SIZE"] == "50" and os.environ["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"
    assert os.environ["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"] == str(trace_dir / "rank_")
    pipe = trace_dir / "rank_0.pipe"  # ProcessGroupNCCL's name: the stem, the rank, ".pipe"
    os.mkfifo(pipe)
    reader = os.open(pipe, os.O_RDONLY | os.O_NONBLOCK)

    def nccl_watchdog():  # what torch does when the pipe has data: dump to TEMP_FILE + rank
        while not os.read(reader, 128):
            time.sleep(0.01)
        (trace_dir / "rank_0").write_bytes(b"flight recorder entries")

    torch_side = threading.Thread(target=nccl_watchdog, daemon=True)
    torch_side.start()
    monkeypatch.setattr(watchdog, "DUMP_GRACE_S", 0.1)
    watch = StepWatch(tmp_path / "run", 0, [("h", "n")], factor=0, floor_s=1, long_s=60)
    assert watch.on_hang({"step": 3, "phase": "waiting", "arrivals": 1}, 9.0, 2.0) == HANG_EXIT_CODE
    torch_side.join(5)
    os.close(reader)
    assert (tmp_path / "run" / "hang-3" / "nccl-rank-0.trace").read_bytes() == b"flight recorder entries"


def test_stragglers_are_ranks_well_above_the_median_rank():
    named = name_stragglers([1.0, 1.1, 3.0, 1.05], ["a", "b", "c", "d"], pct=50)
    assert named == [{"rank": 2, "host": "c", "compute_s": 3.0, "slower_pct": round(100 * (3.0 / 1.075 - 1), 1)}]
    assert describe(named) == "rank 2 on c (+179%)"
    # Two noisy ranks: 1.4x is noise at 50% (the median of two is their mean: 1.4 / 1.2 = +17%).
    assert name_stragglers([1.0, 1.4], ["a", "b"], pct=50) == []
    assert name_stragglers([0.1, 0.5], ["a", "b"], pct=50)[0]["rank"] == 1  # 0.5 / 0.3 = +67%
    assert name_stragglers([2.0], ["a"], pct=50) == []
    lines, intervals = slowest_nodes([[], named, [{**named[0], "slower_pct": 100.0}],
                                      [{"rank": 0, "host": "a", "slower_pct": 300.0}]])
    assert intervals == 4
    assert lines == ["rank 2 on c: named in 2 of 4 log intervals, median +140% over the median rank",
                     "rank 0 on a: named in 1 of 4 log intervals, median +300% over the median rank"]


def test_straggler_report_without_other_ranks_names_nobody():
    class OneRank:
        world_size = 1

    logged = []
    report = StragglerReport(["a"], 50, log=logged.append)
    report.add(1.0)
    assert report.gather(OneRank()) == [] and report.interval == []
    report.close()
    assert logged == []  # nothing was compared


def test_test_hook_sleeps_only_the_named_rank_and_step(monkeypatch):
    slept = []
    monkeypatch.setattr(watchdog.time, "sleep", slept.append)
    monkeypatch.setenv(watchdog.TEST_SLEEP_ENV, "1:5:2.5")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    for rank, step in ((0, 5), (1, 4), (1, 5)):
        watchdog.slow_down_for_test(rank, step)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # a requeued job runs undisturbed
    watchdog.slow_down_for_test(1, 5)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    monkeypatch.setenv(watchdog.TEST_SLEEP_ENV, "0:all:0.1")
    watchdog.slow_down_for_test(0, 9)
    assert slept == [2.5, 0.1]


# ------------------------------------------------- slow: real 2-rank runs ----------------------------------------
HANG_MIN_S = 6.0


def _start(prepared_data, out: Path, env: dict, **overrides) -> subprocess.Popen:
    args = trainer_args(prepared_data, out, devices=2, strategy="ddp", **overrides)
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "MASTER_PORT": str(_free_port()),
                **env}
    # Own session: the ranks Fabric starts are killed with it if the test fails half-way.
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _finish(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        try:  # the other rank (a child of rank 0) exits by itself; never leave it behind
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return out, err


@pytest.mark.slow
def test_a_rank_sleeping_inside_a_step_is_reported_and_the_run_exits_with_the_hang_code(prepared_data, tmp_path):
    out = tmp_path / "run"
    proc = _start(prepared_data, out, {watchdog.TEST_SLEEP_ENV: "1:6:300"}, max_steps=30, hang_min_s=HANG_MIN_S,
                  hang_factor=10)
    deadline = time.monotonic() + 120
    while not ((out / "metrics.jsonl").exists() and '"step": 5,' in (out / "metrics.jsonl").read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, _finish(proc, 5)
        time.sleep(0.05)
    step_5_done = time.monotonic()
    stdout, stderr = _finish(proc, 60)
    took = time.monotonic() - step_5_done
    assert proc.returncode == HANG_EXIT_CODE, stdout[-3000:] + stderr[-3000:]
    assert took <= 2 * HANG_MIN_S, f"exited {took:.1f} s after step 6 began"
    hang_dir = out / "hang-6"
    report = json.loads((hang_dir / "report.json").read_text())
    host = socket.gethostname()
    assert [(e["rank"], e["host"], e["phase"]) for e in report["not_arrived"]] == [(1, host, "computing")], report
    assert report["ranks"]["0"] == {"host": host, "phase": "waiting"}
    assert (hang_dir / "exclude_nodes").read_text().strip() == host
    waiting, sleeping = (hang_dir / "rank-0.txt").read_text(), (hang_dir / "rank-1.txt").read_text()
    assert "step: 6\nphase: waiting\narrivals: 1" in waiting and "in train_step" in waiting
    assert "step: 6\nphase: computing\narrivals: 0" in sleeping and "in slow_down_for_test" in sleeping
    lines = [line for line in stderr.splitlines() if "hung" in line]
    assert len(lines) == 1 and f"rank 1 on {host}" in lines[0] and "step 6" in lines[0], stderr[-3000:]
    assert not (out / "hang-6" / "rank-0.partial").exists()


def _run_to_end(prepared_data, out: Path, env: dict) -> tuple[str, list[dict]]:
    proc = _start(prepared_data, out, env, max_steps=12, log_interval=4, micro_batch_size=4, global_batch_size=8)
    stdout, stderr = _finish(proc, 180)
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    summary = subprocess.run([sys.executable, "scripts/summarize_run.py", str(out)], cwd=ROOT, capture_output=True,
                             text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True).stdout
    return stdout + summary, [r for r in metrics(out) if "loss" in r]


@pytest.mark.slow
def test_a_rank_slowed_every_step_is_named_as_straggler(prepared_data, tmp_path):
    text, records = _run_to_end(prepared_data, tmp_path / "slow", {watchdog.TEST_SLEEP_ENV: "1:all:1.0"})
    host = socket.gethostname()
    assert [r["step"] for r in records] == [4, 8, 12]
    for r in records:  # each interval: rank 1 slept 1 s per step on top of the same compute as rank 0
        assert [s["rank"] for s in r["stragglers"]] == [1], r
        assert r["stragglers"][0]["host"] == host and r["stragglers"][0]["compute_s"] >= 1.0
    assert text.count(f"stragglers: rank 1 on {host} (+") == 3, text
    assert f"Stragglers (most often first): rank 1 on {host}: named in 3 of 3 log intervals" in text
    assert f"stragglers: rank 1 on {host}: named in 3 of 3 log intervals" in text  # summarize_run.py


@pytest.mark.slow
def test_a_healthy_run_names_no_straggler(prepared_data, tmp_path):
    text, records = _run_to_end(prepared_data, tmp_path / "healthy", {})
    assert len(records) == 3 and not any("stragglers" in r for r in records), records
    assert "Stragglers: none in 3 log intervals" in text and "stragglers: none in 3 logged steps" in text
