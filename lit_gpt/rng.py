"""The random-number state of one rank, saved in checkpoints (one per rank) so that a resume continues its streams."""
from __future__ import annotations

import random

import torch

# Spreads the elastic re-seeding of consecutive steps (a prime, so that step and rank never collide for < 1e6 ranks)
_STEP_STRIDE = 1000003


class RNGState:
    """Stateful (state_dict/load_state_dict) view of torch's CPU generator, Python's `random` and, where present,
    the current CUDA device's generator."""

    def state_dict(self) -> dict:
        state = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        random.setstate(state["python"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])

    def resume(self, saved: list[dict] | None, rank: int, world_size: int, seed: int, step: int) -> None:
        """Continue rank `rank`'s saved stream when the checkpoint (one state per rank in `saved`) was written by as
        many ranks; otherwise (an elastic resume, or none saved) seed deterministically from (seed, step, rank)."""
        if saved is not None and len(saved) == world_size:
            self.load_state_dict(saved[rank])
        else:
            torch.manual_seed(seed + _STEP_STRIDE * step + rank)
