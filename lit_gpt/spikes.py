"""Loss-spike detection: which step's loss is far above the recent ones, or how many steps in a row were non-finite.

A step is a spike when its loss exceeds the mean of the last `window` finite step losses by more than `sigma` of
their (population) standard deviations, checked only once the window is full, or when it is the
`max_nonfinite`-th non-finite step in a row. A spike's loss does not enter the window. The window is part of the
checkpoint (`state_dict`), so a resumed run decides exactly as the run that never stopped.

The losses arrive all-reduced (identical on every rank), so every rank decides the same without a collective.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class Spike:
    step: int  # the optimizer step (as logged: 1 is the first) whose loss spiked
    loss: float
    mean: float  # of the window (nan for a non-finite spike before the window filled)
    std: float
    nonfinite_in_a_row: int  # > 0: a run of non-finite steps, not a high loss

    def describe(self) -> str:
        if self.nonfinite_in_a_row:
            return f"{self.nonfinite_in_a_row} consecutive non-finite steps up to step {self.step}"
        return (f"loss spike at step {self.step}: loss {self.loss:.4f}, {(self.loss - self.mean) / self.std:.1f} "
                f"standard deviations above the mean {self.mean:.4f} (std {self.std:.4f}) of the steps before"
                if self.std > 0 else f"loss spike at step {self.step}: loss {self.loss:.4f} above the constant "
                                     f"{self.mean:.4f} of the steps before")

    def record(self) -> dict:
        """The spike's fields for a metrics record (JSON: no nan)."""
        return {"spike_step": self.step, "spike_loss": self.loss if math.isfinite(self.loss) else None,
                "window_mean": self.mean if math.isfinite(self.mean) else None,
                "window_std": self.std if math.isfinite(self.std) else None,
                "nonfinite_in_a_row": self.nonfinite_in_a_row}


class SpikeDetector:
    def __init__(self, window: int, sigma: float, max_nonfinite: int) -> None:
        """`sigma` = inf: only runs of non-finite steps count."""
        if window < 2 or not sigma > 0 or max_nonfinite < 1:
            raise ValueError(f"window {window} (>= 2), sigma {sigma} (> 0), max_nonfinite {max_nonfinite} (>= 1)")
        self.window, self.sigma, self.max_nonfinite = window, sigma, max_nonfinite
        self.losses: deque[float] = deque(maxlen=window)
        self.nonfinite_in_a_row = 0

    def statistics(self) -> tuple[float, float]:
        """(mean, population standard deviation) of the window; nan before it holds a loss."""
        if not self.losses:
            return math.nan, math.nan
        mean = math.fsum(self.losses) / len(self.losses)
        return mean, math.sqrt(math.fsum((x - mean) ** 2 for x in self.losses) / len(self.losses))

    def observe(self, step: int, loss: float, finite: bool) -> Spike | None:
        """Step `step`'s all-reduced loss (`finite`: loss and gradient norm both finite); the spike, if it is one."""
        mean, std = self.statistics()
        if not finite:
            self.nonfinite_in_a_row += 1
            if self.nonfinite_in_a_row >= self.max_nonfinite:
                return Spike(step, loss, mean, std, self.nonfinite_in_a_row)
            return None
        self.nonfinite_in_a_row = 0
        if len(self.losses) == self.window and loss > mean + self.sigma * std:
            return Spike(step, loss, mean, std, 0)
        self.losses.append(loss)
        return None

    def state_dict(self) -> dict:
        return {"losses": list(self.losses), "nonfinite_in_a_row": self.nonfinite_in_a_row}

    def load_state_dict(self, state: dict | None) -> None:
        """A checkpoint's state; None (a checkpoint written without it) starts empty. A window of another length
        (--spike_window changed) keeps its newest losses."""
        state = state or {}
        self.losses = deque(state.get("losses", []), maxlen=self.window)
        self.nonfinite_in_a_row = int(state.get("nonfinite_in_a_row", 0))
