"""A throw-away one-node Slurm cluster on localhost: try the sbatch scripts (and test them) without a real cluster.

    python cluster/slurm_local.py [--dir DIR]     # starts munged, slurmctld, slurmd; prints SLURM_CONF; Ctrl-C stops

Everything lives in one directory (config, munge key, state, logs); the daemons run in the foreground as children of
this process, on free ports and with their own munge socket, so several clusters (and a system one) can coexist.
Stopping kills exactly the PIDs started here plus job processes that carry this cluster's SLURM_CONF.
Needs Debian's slurm-wlm and munge (cluster/install_ci_deps.sh); the daemons must run as root (SlurmdUser).
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo")


class SlurmUnavailable(RuntimeError):
    """Slurm cannot be set up here (binaries missing, not root); the message says what is missing."""


def _which(name: str) -> str | None:
    # Daemons live in /usr/sbin, which is not on every user's PATH.
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")


def missing_requirements() -> str | None:
    """None when a local cluster can be started, else a reason naming what is missing."""
    missing = [n for n in DAEMONS + CLIENTS if _which(n) is None]
    if missing:
        return (f"Slurm/munge not installed (missing {', '.join(missing)}); "
                "install Debian's slurm-wlm and munge, e.g. bash cluster/install_ci_deps.sh")
    if os.geteuid() != 0:
        return "slurmd must run as root to launch jobs (SlurmdUser=root); run as root"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memory_mb() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20


class LocalSlurm:
    """munged + slurmctld + slurmd for NodeName=localhost. Use as a context manager or call start()/stop()."""

    def __init__(self, workdir: Path | None = None, cpus: int = 2, requeue_delay_s: int = 5) -> None:
        reason = missing_requirements()
        if reason:
            raise SlurmUnavailable(reason)
        # A directory we created is ours to delete on stop(); a given one (e.g. a test's tmp_path) is kept.
        self._own_dir = workdir is None
        self.dir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="slurm-local-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        # Unix socket paths are limited to ~107 bytes; keep munge's socket in a short private dir.
        self.sock_dir = Path(tempfile.mkdtemp(prefix="munge-"))
        self.cpus = cpus
        self.requeue_delay_s = requeue_delay_s
        self.conf = self.dir / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        self._logs: list = []

    # --------------------------------------------------------------------------------------------------------------
    @property
    def env(self) -> dict:
        """Environment for Slurm clients (sbatch, scontrol, ...) talking to this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def _write_config(self) -> None:
        d = self.dir
        for sub in ("state", "spool", "log", "munge"):
            (d / sub).mkdir(exist_ok=True)
        (d / "munge").chmod(0o700)
        key = d / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        socket_path = self.sock_dir / "munge.socket"
        # cred_expire is also the time a requeued job waits before it may start again (default 120 s).
        lines = [
            "ClusterName=local",
            "SlurmctldHost=localhost",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={socket_path},cred_expire={self.requeue_delay_s}",
            f"StateSaveLocation={d / 'state'}",
            f"SlurmdSpoolDir={d / 'spool'}",
            f"SlurmctldPidFile={d / 'slurmctld.pid'}",
            f"SlurmdPidFile={d / 'slurmd.pid'}",
            f"SlurmctldLogFile={d / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={d / 'log' / 'slurmd.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            # No cgroups in containers/CI: track processes via /proc and bind nothing.
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/builtin",
            # Requeued jobs become eligible by time, not by an event: rerun the scheduler every second.
            "SchedulerParameters=sched_interval=1",
            "MpiDefault=none",
            "ReturnToService=2",
            "JobRequeue=1",
            "MailProg=/bin/true",
            "KillWait=10",
            "MinJobAge=600",  # keep finished jobs visible to scontrol for the test's checks
            # A node with fewer real CPUs than configured (small CI runners) must not be drained.
            "SlurmdParameters=config_overrides",
            # The machine's memory (Slurm's default is 1 MB): jobs that request memory, as datatrove's do, must fit.
            f"NodeName=localhost CPUs={self.cpus} RealMemory={_memory_mb()} State=UNKNOWN",
            "PartitionName=local Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.dir / "log" / f"{name}.stdout", "ab")
        self._logs.append(log)
        # Own session: the daemons must not receive the terminal's Ctrl-C before we stop them in order.
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)

    def start(self, timeout: float = 60.0) -> LocalSlurm:
        self._write_config()
        m = self.dir / "munge"
        self._spawn("munged", [_which("munged"), "--foreground", "--force",
                               f"--socket={self.sock_dir / 'munge.socket'}",
                               f"--key-file={m / 'munge.key'}", f"--pid-file={m / 'munged.pid'}",
                               f"--log-file={m / 'munged.log'}", f"--seed-file={m / 'munged.seed'}"])
        self._wait(lambda: (self.sock_dir / "munge.socket").exists(), timeout, "munged socket")
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-c", "-i", "-f", str(self.conf)])
        self._wait(lambda: self._run("scontrol", "ping").returncode == 0
                   and "UP" in self._run("scontrol", "ping").stdout, timeout, "slurmctld")
        self._spawn("slurmd", [_which("slurmd"), "-D", "-N", "localhost", "-f", str(self.conf)])
        self._wait(lambda: self.node_state() in ("IDLE", "MIXED", "ALLOCATED"), timeout, "slurmd (node idle)")
        return self

    def _run(self, *argv: str, check: bool = False, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(list(argv), env=self.env, capture_output=True, text=True, check=check, timeout=timeout)

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode} while waiting for {what}:\n{self.logs()}")
            try:
                if ready():
                    return
            except subprocess.TimeoutExpired:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}:\n{self.logs()}")

    # --------------------------------------------------------------------------------------------------------------
    def node_state(self) -> str:
        out = self._run("sinfo", "-h", "-n", "localhost", "-o", "%T").stdout.strip().upper()
        return out.rstrip("*~#!%$@^-+").split("\n")[0] if out else ""

    def sbatch(self, *args: str, cwd: Path | None = None, env: dict | None = None) -> int:
        """Submit; returns the job id. `env` is merged into the cluster environment (sbatch exports it to the job)."""
        result = subprocess.run(["sbatch", "--parsable", *args], env={**self.env, **(env or {})}, cwd=cwd,
                                capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
        return int(result.stdout.strip().split(";")[0])

    def job_info(self, job_id: int) -> dict:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...); empty once the job is forgotten."""
        out = self._run("scontrol", "show", "job", "-o", str(job_id)).stdout
        info = {}
        for token in out.split():
            key, sep, value = token.partition("=")
            if sep:
                info[key] = value
        return info

    def wait_for(self, job_id: int, states: tuple[str, ...], timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        info = {}
        while time.monotonic() < deadline:
            info = self.job_info(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not in {states} after {timeout:.0f} s (last: {info.get('JobState')}):\n"
                           f"{self.logs()}")

    def logs(self, tail: int = 40) -> str:
        parts = []
        for path in sorted((self.dir / "log").glob("*")) + [self.dir / "munge" / "munged.log"]:
            if path.is_file():
                lines = path.read_text(errors="replace").splitlines()[-tail:]
                parts.append(f"--- {path.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    # --------------------------------------------------------------------------------------------------------------
    def _own_job_pids(self) -> list[int]:
        """Processes (slurmstepd, job scripts, tasks) whose environment names this cluster's config.

        The daemons and their direct helpers (slurmctld's slurmscriptd) are left out: stop() ends those itself.
        """
        marker = f"SLURM_CONF={self.conf}".encode()
        started = {p.pid for p in self.procs.values()}
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) in started or int(entry.name) == os.getpid():
                continue
            try:
                if marker not in (entry / "environ").read_bytes().split(b"\0"):
                    continue
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid not in started:
                pids.append(int(entry.name))
        return pids

    def stop(self) -> None:
        """Cancel jobs, stop slurmd, slurmctld, munged (in that order) by PID; kill stragglers of our jobs."""
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            try:
                self._run("scancel", "--full", "--user", str(os.getuid()), timeout=10)
            except (subprocess.TimeoutExpired, OSError):
                pass
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and self._own_job_pids():
                time.sleep(0.3)
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            p.terminate()
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        for pid in self._own_job_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for log in self._logs:
            log.close()
        self._logs.clear()
        shutil.rmtree(self.sock_dir, ignore_errors=True)
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> LocalSlurm:
        try:
            return self.start()
        except BaseException:  # __exit__ does not run when __enter__ fails: stop the daemons already started
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, help="working directory (default: a new temporary one)")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the node (default 2)")
    args = parser.parse_args()
    try:
        cluster = LocalSlurm(args.dir, cpus=args.cpus)
    except SlurmUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    try:
        cluster.start()
        print(f"Local Slurm cluster up. In another shell:\n  export SLURM_CONF={cluster.conf}\n  sinfo; sbatch ...\n"
              "Ctrl-C stops it.", flush=True)
        while not stop:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
