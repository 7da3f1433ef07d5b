"""The straggler report: which ranks compute their steps markedly slower than the others.

Each rank times its own steps up to arriving at the step's collectives (lit_gpt/watchdog.StepWatch: waiting for the
others does not count). Once per log interval the ranks gather the median of their interval (one small all_gather);
a rank slower than the median rank by more than --straggler_pct percent is named, with its host, in the log line and
in the metrics record ("stragglers"). The run's end and scripts/summarize_run.py list the nodes named most often.
Medians (over the interval's steps and over the ranks) keep one slow step or one noisy rank from naming anybody.
Pure Python apart from gather(): summarize_run.py reads the records without torch."""
from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable


def name_stragglers(compute_s: list[float], hosts: list[str], pct: float) -> list[dict]:
    """The ranks whose median step compute time is more than `pct` percent above the median over the ranks."""
    if len(compute_s) < 2:
        return []
    reference = statistics.median(compute_s)
    if reference <= 0:
        return []
    return [{"rank": r, "host": hosts[r], "compute_s": round(t, 4), "slower_pct": round(100 * (t / reference - 1), 1)}
            for r, t in enumerate(compute_s) if t > reference * (1 + pct / 100)]


def describe(stragglers: list[dict]) -> str:
    return ", ".join(f"rank {s['rank']} on {s['host']} (+{s['slower_pct']:.0f}%)" for s in stragglers)


def slowest_nodes(named_per_interval: Iterable[list[dict]]) -> tuple[list[str], int]:
    """(one line per rank named at least once, most often first; the number of intervals) over the records."""
    counts: dict[tuple[int, str], list[float]] = {}
    intervals = 0
    for named in named_per_interval:
        intervals += 1
        for s in named:
            counts.setdefault((s["rank"], s["host"]), []).append(s["slower_pct"])
    ranked = sorted(counts.items(), key=lambda item: (-len(item[1]), -statistics.median(item[1])))
    return [f"rank {rank} on {host}: named in {len(pcts)} of {intervals} log intervals, median +"
            f"{statistics.median(pcts):.0f}% over the median rank" for (rank, host), pcts in ranked], intervals


class StragglerReport:
    """Collects this rank's step compute times and names the stragglers at each log step (a collective call)."""

    def __init__(self, hosts: list[str], pct: float, log: Callable[[str], None] = print) -> None:
        self.hosts, self.pct, self.log = hosts, pct, log
        self.interval: list[float] = []
        self.history: list[list[dict]] = []  # rank 0: who was named at each log step of this process

    def add(self, compute_s: float) -> None:
        self.interval.append(compute_s)

    def gather(self, fabric) -> list[dict]:
        """Every rank calls this at the same step; all get the same list."""
        import torch
        import torch.distributed

        mine = statistics.median(self.interval) if self.interval else 0.0
        self.interval = []
        if fabric.world_size < 2:
            return []
        # (Not Fabric's all_gather: it goes through a deprecated autograd wrapper that warns on every rank.)
        times = torch.zeros(fabric.world_size, dtype=torch.float64, device=fabric.device)
        torch.distributed.all_gather_single(times, torch.tensor([mine], dtype=torch.float64, device=fabric.device))
        named = name_stragglers(times.tolist(), self.hosts, self.pct)
        self.history.append(named)
        return named

    def close(self) -> None:
        """The run's end: the slowest nodes, or that nobody was named (nothing without a gathered interval)."""
        lines, intervals = slowest_nodes(self.history)
        if intervals:
            self.log(("Stragglers (most often first): " + "; ".join(lines)) if lines else
                     f"Stragglers: none in {intervals} log intervals")
