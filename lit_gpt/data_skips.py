"""Data steps a run skips for good (after a loss-spike rollback): the mapping training step -> data step.

Without skips training step t reads data step t, i.e. the global sample positions t*G .. t*G+G-1. A skip removes
data steps from the order: training step t then reads the t-th data step that is not skipped, so the sample order
advances past the skipped steps and every later step reads what it would have read one skip later. The skips are
stored as sorted, disjoint, merged ranges [first data step, count] in the checkpoint (see lit_gpt.rollback), so that
a resumed run reads exactly what the run that never stopped read.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np


class DataSkips:
    """Skipped data-step ranges; immutable (`with_skipped` returns a new one)."""

    def __init__(self, ranges: Iterable[Iterable[int]] = ()) -> None:
        merged: list[list[int]] = []
        for first, count in sorted((int(a), int(b)) for a, b in ranges):
            if first < 0 or count < 1:
                raise ValueError(f"skipped data steps [{first}, +{count}): expected first >= 0 and count >= 1")
            if merged and first <= merged[-1][0] + merged[-1][1]:  # touching or overlapping: one range
                merged[-1][1] = max(merged[-1][1], first + count - merged[-1][0])
            else:
                merged.append([first, count])
        self.ranges: tuple[tuple[int, int], ...] = tuple((a, b) for a, b in merged)

    def __eq__(self, other) -> bool:
        return isinstance(other, DataSkips) and self.ranges == other.ranges

    def __repr__(self) -> str:
        return f"DataSkips({[list(r) for r in self.ranges]})"

    def __bool__(self) -> bool:
        return bool(self.ranges)

    def data_steps(self, step: int, steps: int = 1) -> np.ndarray:
        """The data steps that training steps step .. step+steps-1 read."""
        data = np.arange(step, step + steps, dtype=np.int64)
        # Ranges in increasing order: a step shifted past one range is compared with the next in data-step terms.
        for first, count in self.ranges:
            data += count * (data >= first)
        return data

    def data_step(self, step: int) -> int:
        return int(self.data_steps(step)[0])

    def with_skipped(self, data_steps: Iterable[int]) -> DataSkips:
        """These skips and the given data steps (any order, not necessarily contiguous)."""
        return DataSkips([*self.ranges, *((int(d), 1) for d in data_steps)])

    def state(self) -> list[list[int]]:
        """For the checkpoint (plain ints: it loads with weights_only=True)."""
        return [list(r) for r in self.ranges]
