"""Loss-spike rollback: on a spike (lit_gpt.spikes) go back to the newest good checkpoint before it, skip the data of
the spike's steps for good (lit_gpt.data_skips) and train on.

At a spike of step S (the S-th optimizer step, as metrics.jsonl counts) the run goes back to the newest checkpoint
that verifies with a step C < S and skips the data steps that training steps max(C, S - skip_steps) .. S - 1
(0-based, as the data loader and the datapoint log count; the spike's own step is S - 1) read: the spike's step and
the skip_steps - 1 before it, never those before the checkpoint. The rollback is recorded in metrics.jsonl (an
"event": "rollback" record with the step C + 1, the first one trained again) and in the datapoint log
(datapoints/skipped-*.npz, see lit_gpt.datapoints).

What a checkpoint carries for this (`state_dict`): the detector's window, the skips so far and the number of
rollbacks. A run resumed from a checkpoint before a rollback replays it exactly (same state, same losses, same
decision); one resumed after it reads past the same skipped data. The count goes on from the run's current
count, not the checkpoint's, so that repeated spikes end after max_rollbacks.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from lit_gpt.checkpoint import ranks
from lit_gpt.checkpoint.find import list_checkpoints, newest_that_verifies
from lit_gpt.data_skips import DataSkips
from lit_gpt.run_dir import checkpoint_step
from lit_gpt.spikes import Spike, SpikeDetector


class Rollbacks:
    def __init__(self, window: int, sigma: float, max_nonfinite: int, max_rollbacks: int, skip_steps: int) -> None:
        """`max_rollbacks` 0: no rollback; loss spikes are not looked for, non-finite runs still end the run."""
        self.max_rollbacks, self.skip_steps = max_rollbacks, skip_steps
        self.detector = SpikeDetector(window, sigma if max_rollbacks else math.inf, max_nonfinite)
        self.skips = DataSkips()
        self.count = 0  # rollbacks so far

    @property
    def enabled(self) -> bool:
        return self.max_rollbacks > 0

    def state_dict(self) -> dict:
        """The checkpoint's keys for it (plain Python values: checkpoints load with weights_only=True)."""
        return {"spike_detector": self.detector.state_dict(), "data_skips": self.skips.state(),
                "rollbacks": self.count}

    def load_state_dict(self, meta: dict) -> None:
        """From a checkpoint's metadata; one written without these keys has neither skips nor rollbacks."""
        self.detector.load_state_dict(meta.get("spike_detector"))
        self.skips = DataSkips(meta.get("data_skips", ()))
        self.count = int(meta.get("rollbacks", 0))

    def observe(self, step: int, loss: float, finite: bool) -> Spike | None:
        return self.detector.observe(step, loss, finite)

    def exhausted(self, spike: Spike) -> str | None:
        """The error line when no rollback is left for this spike."""
        if self.count < self.max_rollbacks:
            return None
        return (f"{spike.describe()}; the run has rolled back {self.count} time{'s' if self.count != 1 else ''} "
                f"already (--max_rollbacks {self.max_rollbacks}): giving up")

    @staticmethod
    def checkpoint_before(out_dir: Path, step: int) -> Path | None:
        """The newest checkpoint of a step before `step` that verifies (collective: rank 0 decides)."""
        found = [p for p in list_checkpoints(Path(out_dir)) if checkpoint_step(p) < step]
        return ranks.decided_by_rank_zero(lambda: newest_that_verifies(found, allow_unverified=False))

    @staticmethod
    def no_checkpoint(spike: Spike, save_interval: int) -> str:
        return (f"{spike.describe()}, and no checkpoint of a step before {spike.step} to roll back to (the first is "
                f"saved at step --save_interval {save_interval})")

    def skipped_steps(self, spike: Spike, checkpoint: int) -> tuple[np.ndarray, np.ndarray]:
        """(training steps, 0-based, and the data steps they read) whose data a rollback to `checkpoint` skips."""
        first = max(checkpoint, spike.step - self.skip_steps)
        return np.arange(first, spike.step, dtype=np.int64), self.skips.data_steps(first, spike.step - first)

    def rolled_back(self, data_steps: np.ndarray, before: tuple[DataSkips, int]) -> None:
        """After the checkpoint's state was loaded: the skips and count of the run before it went back (`before`),
        plus this rollback's."""
        skips, count = before
        self.skips, self.count = skips.with_skipped(data_steps), count + 1


def samples_of_data_steps(dataset, data_steps: np.ndarray, global_batch_size: int) -> np.ndarray:
    """[steps, global_batch_size] global sample ids that these data steps read, in global order (all ranks)."""
    positions = data_steps[:, None] * global_batch_size + np.arange(global_batch_size, dtype=np.int64)
    return dataset.sample_ids(positions.ravel()).reshape(len(data_steps), global_batch_size)


def rollback_record(spike: Spike, number: int, checkpoint: Path, steps: np.ndarray, data_steps: np.ndarray,
                    samples: np.ndarray) -> dict:
    """The metrics.jsonl record of a rollback (step: the first step trained again)."""
    c = checkpoint_step(checkpoint)
    return {"event": "rollback", "step": c + 1, "rollback": number, **spike.record(), "checkpoint_step": c,
            "checkpoint": checkpoint.name, "skipped_from_step": int(steps[0]) + 1, "skipped_to_step": spike.step,
            "skipped_data_steps": data_steps.tolist(), "skipped_samples": samples.tolist()}


def keeps_rollbacks_to(checkpoint: int):
    """For MetricsLog(keep=...) at an in-process rollback to `checkpoint`: the records of the earlier rollbacks to
    the same checkpoint stay (their step is checkpoint + 1)."""
    return lambda record: record.get("event") == "rollback" and record.get("checkpoint_step") == checkpoint
