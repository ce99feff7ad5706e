"""Collectives for the losses that reduce to identities in a single process, so one code path serves both."""

import torch.distributed as dist
from torch import Tensor


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of processes in the default group (1 when torch.distributed is not initialised)."""
    return dist.get_world_size() if _is_distributed() else 1


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum `t` over all processes in place and return it."""
    if _is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: Tensor) -> Tensor:
    """Element-wise maximum of `t` over all processes, in place; returns it."""
    if _is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t
