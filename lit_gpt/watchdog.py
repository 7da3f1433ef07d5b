"""Hang detection: a per-rank watchdog thread that notices a training step far slower than the steps before it.

The process group's timeout (--dist_timeout_s) stays long: start-up, the first steps, validation and checkpoint
loads and saves may take long, and it is the only bound there. Inside a training step the watchdog is stricter: once
WARMUP_STEPS steps were timed, a step that runs longer than --hang_factor times the median step so far (at least
--hang_min_s) is a hang. Then every rank whose Python still runs writes its stacks (all threads) and where it was
(computing, or waiting in one of the step's collectives) to out_dir/hang-STEP/rank-R.txt; rank 0 (or rank 1, when
rank 0 does not report) waits up to DUMP_GRACE_S for the others, writes hang-STEP/report.json and hang-STEP/exclude_nodes naming the ranks that did not
arrive at the collective the others wait in (a rank that wrote nothing counts as not arrived), and every rank exits
with HANG_EXIT_CODE. The Slurm job script (cluster/exec/train_fabric.sh) then excludes those nodes and requeues.
"""
from __future__ import annotations

import faulthandler
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch.distributed

# EX_TEMPFAIL: "try again later". The job script requeues the job without the nodes the hang report names.
HANG_EXIT_CODE = 75
WARMUP_STEPS = 3  # steps timed against --dist_timeout_s: compilation, allocator and cache warm-up
STEP_HISTORY = 100  # the median is over this many recent steps
DUMP_GRACE_S = 30.0  # rank 0 waits this long for the other ranks' dumps (less when all are there)
NCCL_TRACE_DIR = "llammlein-nccl-flight-recorder"  # in the node's temp dir, per job: the NCCL dumps and pipes
# Test-only: "RANK:STEP:SECONDS" makes rank RANK sleep SECONDS inside step STEP (its computing phase, before the
# step's first collective); STEP "all" slows every step. Applies only to a job's first run (not after a requeue).
TEST_SLEEP_ENV = "LLAMMLEIN_TEST_SLOW_RANK"


def node_name() -> str:
    """The name Slurm knows this node by (what ExcNodeList takes); the hostname outside Slurm."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def gather_hosts(fabric) -> list[tuple[str, str]]:
    """(hostname, Slurm node name) of every rank, in rank order (a collective): a hung rank cannot tell later."""
    mine = (socket.gethostname(), node_name())
    if fabric.world_size < 2:
        return [mine]
    hosts: list = [None] * fabric.world_size
    torch.distributed.all_gather_object(hosts, mine)
    return [tuple(h) for h in hosts]


def step_limit(durations: list[float], factor: float, floor_s: float, long_s: float) -> float:
    """Seconds the next step may take before it counts as a hang."""
    if factor <= 0 or len(durations) < WARMUP_STEPS:
        return long_s
    return min(long_s, max(floor_s, factor * statistics.median(durations[-STEP_HISTORY:])))


def not_arrived(dumps: dict[int, dict], world_size: int) -> list[int]:
    """The ranks that did not reach the collective the waiting ranks are in. `dumps` maps a rank to its dump's
    header (step, arrivals: collectives of the step it entered, phase) and lacks the ranks that wrote nothing."""
    waiting = [(d["step"], d["arrivals"]) for d in dumps.values() if d["phase"] == "waiting"]
    if not waiting:  # nobody waits for anybody: only the silent ranks can be named
        return [r for r in range(world_size) if r not in dumps]
    target = max(waiting)
    return [r for r in range(world_size) if r not in dumps or (dumps[r]["step"], dumps[r]["arrivals"]) < target]


def read_dump_header(path: Path) -> dict:
    """The "key: value" lines before the first blank line of a rank's dump."""
    header = {}
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            break
        key, _, value = line.partition(": ")
        header[key] = value
    return {**header, "rank": int(header["rank"]), "step": int(header["step"]), "arrivals": int(header["arrivals"])}


def hang_report(step: int, dumps: dict[int, dict], hosts: list[tuple[str, str]], limit_s: float) -> dict:
    """report.json's content. `hosts`: (hostname, Slurm node name) of every rank, gathered at start-up."""
    missing = not_arrived(dumps, len(hosts))
    return {"step": step, "limit_s": round(limit_s, 3),
            "not_arrived": [{"rank": r, "host": hosts[r][0], "node": hosts[r][1],
                             "phase": dumps[r]["phase"] if r in dumps else "no dump"} for r in missing],
            "ranks": {str(r): {"host": hosts[r][0], "phase": dumps[r]["phase"] if r in dumps else "no dump"}
                      for r in range(len(hosts))}}


def describe_hang(report: dict, hang_dir: Path) -> str:
    """The one log line of a hang."""
    named = ", ".join(f"rank {e['rank']} on {e['host']}" for e in report["not_arrived"]) or "no rank identified"
    return (f"error: step {report['step']} hung (over {report['limit_s']:.1f} s): did not arrive at the step's "
            f"collective: {named}; stacks in {hang_dir}; exiting with code {HANG_EXIT_CODE}")


def configure_nccl_flight_recorder() -> None:
    """Before the process group exists: keep NCCL's flight recorder and dump it on a timeout and on request (the
    named pipe the watchdog writes to). Node-local, beside the pipes (out_dir would keep a failed start's pipes); a
    hang's dumps are moved into its hang directory. Settings the user made are kept."""
    trace_dir = Path(tempfile.gettempdir()) / f"{NCCL_TRACE_DIR}-{os.environ.get('SLURM_JOB_ID') or os.getpid()}"
    trace_dir.mkdir(parents=True, exist_ok=True)  # ProcessGroupNCCL makes its pipe there or fails
    for name, value in (("TORCH_NCCL_TRACE_BUFFER_SIZE", "2000"), ("TORCH_NCCL_DUMP_ON_TIMEOUT", "1"),
                        ("TORCH_NCCL_DEBUG_INFO_TEMP_FILE", str(trace_dir / "rank_")),
                        ("TORCH_NCCL_DEBUG_INFO_PIPE_FILE", str(trace_dir / "rank_"))):
        os.environ.setdefault(name, value)


def _request_nccl_dump(rank: int) -> Path | None:
    """Ask this rank's NCCL watchdog for its flight recorder (it polls the named pipe it made at start-up); the file
    the dump goes to, or None without an NCCL process group."""
    stem, dump = os.environ.get("TORCH_NCCL_DEBUG_INFO_PIPE_FILE"), os.environ.get("TORCH_NCCL_DEBUG_INFO_TEMP_FILE")
    pipe = Path(f"{stem}{rank}.pipe")  # the name ProcessGroupNCCL's DumpPipe gives it
    if not stem or not dump or not pipe.exists():
        return None
    try:
        fd = os.open(pipe, os.O_WRONLY | os.O_NONBLOCK)
        os.write(fd, b"1\n")
        os.close(fd)
    except OSError:  # no reader (no NCCL process group): nothing to dump
        return None
    return Path(f"{dump}{rank}")


def slow_down_for_test(rank: int, step: int) -> None:
    """The test-only hook (TEST_SLEEP_ENV); call inside the step, before its first collective."""
    spec = os.environ.get(TEST_SLEEP_ENV)
    if not spec or os.environ.get("SLURM_RESTART_COUNT", "0") != "0":
        return
    slow_rank, slow_step, seconds = spec.split(":")
    if int(slow_rank) == rank and slow_step in ("all", str(step)):
        time.sleep(float(seconds))


class StepWatch:
    """Times this rank's steps (begin, the step's collectives, end) and runs the watchdog thread.

    compute_s of a step is its time outside the step's collectives: waiting for other ranks there does not count
    (waiting inside backward's gradient all-reduce, which overlaps compute, cannot be told apart and does)."""

    def __init__(self, out_dir: Path, rank: int, hosts: list[tuple[str, str]], factor: float, floor_s: float,
                 long_s: float, log: Callable[[str], None] | None = None,
                 exit_fn: Callable[[int], None] = os._exit) -> None:
        self.out_dir, self.rank, self.hosts = Path(out_dir), rank, hosts
        self.factor, self.floor_s, self.long_s = factor, floor_s, long_s
        # (Not Fabric's print: that prints on each node's first rank, and rank 1 may have to report.)
        self.log = log or (lambda message: print(message, file=sys.stderr, flush=True))
        self.exit_fn = exit_fn
        self.durations: list[float] = []
        self._lock = threading.Lock()
        self.step: int | None = None  # None between steps: validation and checkpoints are the process group's
        self.phase, self.arrivals, self.compute_s = "computing", 0, 0.0
        self._started = self._phase_started = 0.0
        self._limit = long_s
        self._stop = threading.Event()
        self._thread = None
        if factor > 0:
            self._thread = threading.Thread(target=self._watch, name="hang-watchdog", daemon=True)
            self._thread.start()

    def begin(self, step: int) -> None:
        now = time.monotonic()
        with self._lock:
            self.step, self.phase, self.arrivals, self.compute_s = step, "computing", 0, 0.0
            self._started = self._phase_started = now
            self._limit = step_limit(self.durations, self.factor, self.floor_s, self.long_s)

    @contextmanager
    def collective(self):
        """Around one of the step's collectives, up to the point where its result has arrived on the host."""
        with self._lock:
            self.compute_s += time.monotonic() - self._phase_started
            self.phase, self.arrivals = "waiting", self.arrivals + 1
        yield
        with self._lock:
            self.phase, self._phase_started = "computing", time.monotonic()

    def end(self) -> float:
        """Close the step; its compute seconds."""
        now = time.monotonic()
        with self._lock:
            self.compute_s += now - self._phase_started
            self.durations = (self.durations + [now - self._started])[-STEP_HISTORY:]
            self.step = None
            return self.compute_s

    def close(self) -> None:
        self._stop.set()

    # --- the watchdog thread -----------------------------------------------------------------------------------
    def _watch(self) -> None:
        poll = min(1.0, max(0.05, self.floor_s / 20))
        while not self._stop.wait(poll):
            with self._lock:
                step, elapsed, limit = self.step, time.monotonic() - self._started, self._limit
                header = dict(step=step, phase=self.phase, arrivals=self.arrivals)
            if step is not None and elapsed > limit:
                self.exit_fn(self.on_hang(header, elapsed, limit))
                return

    def dump(self, hang_dir: Path, header: dict, elapsed: float) -> None:
        """This rank's dump: where it was, then the stacks of all its threads (written whole, then renamed)."""
        hang_dir.mkdir(parents=True, exist_ok=True)
        host, node = self.hosts[self.rank]
        path = hang_dir / f"rank-{self.rank}.txt"
        partial = path.with_suffix(".partial")
        with open(partial, "w") as f:
            f.write(f"rank: {self.rank}\nhost: {host}\nnode: {node}\nstep: {header['step']}\n"
                    f"phase: {header['phase']}\narrivals: {header['arrivals']}\nelapsed_s: {elapsed:.1f}\n\n")
            f.flush()
            faulthandler.dump_traceback(f, all_threads=True)
        partial.replace(path)

    def on_hang(self, header: dict, elapsed: float, limit: float) -> int:
        """Dump, report (rank 0) or wait for the report (other ranks); the exit code."""
        detected = time.time()
        hang_dir = self.out_dir / f"hang-{header['step']}"
        try:
            self.dump(hang_dir, header, elapsed)
            nccl = _request_nccl_dump(self.rank)
            if self.rank == 0:
                self._report(hang_dir, header["step"], limit)
            # The others exit only once rank 0 has reported (srun kills every task once the first one exits). When
            # rank 0 is too stuck to report, rank 1 stands in for it.
            elif not self._wait_for(lambda: (hang_dir / "report.json").exists() and
                                    (hang_dir / "report.json").stat().st_mtime >= detected - 1, 2 * DUMP_GRACE_S) \
                    and self.rank == 1:
                self._report(hang_dir, header["step"], limit)
            if nccl is not None and self._wait_for(nccl.exists, 5):
                shutil.move(nccl, hang_dir / f"nccl-rank-{self.rank}.trace")  # node-local to out_dir's file system
        except OSError as e:  # e.g. a full disk: the exit code still tells the job script
            print(f"error: rank {self.rank}: could not write the hang dump to {hang_dir}: {e}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        return HANG_EXIT_CODE

    def _report(self, hang_dir: Path, step: int, limit: float) -> None:
        world = len(self.hosts)
        paths = [hang_dir / f"rank-{r}.txt" for r in range(world)]
        self._wait_for(lambda: all(p.exists() for p in paths), DUMP_GRACE_S if self.rank == 0 else 0)
        dumps = {}
        for r, p in enumerate(paths):
            if p.exists():
                dumps[r] = read_dump_header(p)
        report = hang_report(step, dumps, self.hosts, limit)
        nodes = sorted({e["node"] for e in report["not_arrived"]})
        for name, text in (("exclude_nodes", ",".join(nodes) + "\n"), ("report.json", json.dumps(report, indent=2))):
            partial = hang_dir / f"{name}.partial"
            partial.write_text(text)
            partial.replace(hang_dir / name)  # report.json last: the other ranks wait for it
        self.log(describe_hang(report, hang_dir))

    @staticmethod
    def _wait_for(ready: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True
