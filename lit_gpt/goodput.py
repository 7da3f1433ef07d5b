"""Goodput: the share of a run's wall time spent in productive training steps.

Every second since the tracker was made belongs to one phase: "step" (a training step that advances the run),
"rework" (a step trained again after a restart or a rollback: the same step number had been trained before),
"checkpoint", "validation", "rollback", and whatever other features name with `phase(...)`; time in no phase is
"other" (start-up, waiting for data outside a step). Phases nest exclusively: an inner phase's time is taken from
the outer one, so nothing counts twice. Goodput = time in "step" / wall time.
"""
from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

PRODUCTIVE = "step"
REWORK = "rework"


class Goodput:
    def __init__(self, clock: Callable[[], float] = time.perf_counter, started: float | None = None) -> None:
        """`started`: when the run began on `clock` (e.g. before the imports); default now."""
        self.clock = clock
        self.started = clock() if started is None else started
        self.seconds: dict[str, float] = defaultdict(float)
        self._open: list[str] = []  # the phases entered and not left, innermost last
        self._since = self.started  # when the innermost phase last started counting
        self.trained_before = 0  # steps < this were trained before (by an earlier attempt): training them is rework

    def _switch(self) -> None:
        now = self.clock()
        if self._open:
            self.seconds[self._open[-1]] += now - self._since
        self._since = now

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._switch()
        self._open.append(name)
        try:
            yield
        finally:
            self._switch()
            self._open.pop()

    def training_step(self, step: int):
        """The phase of training step `step` (0-based, as the data loader counts)."""
        return self.phase(REWORK if step < self.trained_before else PRODUCTIVE)

    def lost_until(self, step: int) -> None:
        """Steps before `step` had been trained when the run went back (a restart or a rollback)."""
        self.trained_before = max(self.trained_before, step)

    def totals(self) -> dict[str, float]:
        """Seconds per phase so far (open phases up to now), "other" for the rest, and "wall"."""
        now = self.clock()
        seconds = dict(self.seconds)
        if self._open:
            seconds[self._open[-1]] = seconds.get(self._open[-1], 0.0) + now - self._since
        wall = now - self.started
        return {**seconds, "other": max(0.0, wall - sum(seconds.values())), "wall": wall}

    def share(self) -> float:
        totals = self.totals()
        return totals.get(PRODUCTIVE, 0.0) / totals["wall"] if totals["wall"] > 0 else 0.0

    def summary(self) -> str:
        """One line for the run's end: goodput, then every phase's share of the wall time."""
        totals = self.totals()
        wall = totals.pop("wall")
        parts = ", ".join(f"{name} {seconds / wall:.1%}" for name, seconds in
                          sorted(totals.items(), key=lambda item: -item[1]) if seconds > 0) if wall > 0 else ""
        return f"Goodput {self.share():.1%} of {wall:.1f} s wall time ({parts})"
