"""Collective decisions for the checkpoint code: with several ranks, rank 0 decides (verifies, picks a checkpoint)
and every rank gets its verdict, so that all of them take the same checkpoint or stop with the same error."""
from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world_size() -> tuple[int, int]:
    if is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_rank_zero() -> bool:
    return rank_and_world_size()[0] == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def log(message: str) -> None:
    """To stderr, once (rank 0)."""
    if is_rank_zero():
        print(message, file=sys.stderr)


def gather(value) -> list:
    """`value` from every rank, in rank order (just [value] without an initialised process group)."""
    if not is_initialized():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def decided_by_rank_zero(decide: Callable[[], Any]) -> Any:
    """decide() on rank 0; its result, or its exception, on every rank."""
    if not is_initialized():
        return decide()
    outcome = [None]
    if dist.get_rank() == 0:
        try:
            outcome = [(True, decide())]
        except Exception as e:  # re-raised below on every rank, not only here (the others would wait forever)
            outcome = [(False, e)]
    dist.broadcast_object_list(outcome, src=0)
    ok, value = outcome[0]
    if not ok:
        raise value
    return value
