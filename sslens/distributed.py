"""The few collective operations the trainer needs under torchrun, each a no-op for a lone process."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import SSLensError

T = TypeVar("T")


def distributed() -> tuple[int, int]:
    """(rank, world size). Under torchrun, joins the process group: gloo on CPU, nccl on GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def leave(world: int) -> None:
    if world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def on_rank0(world: int, fn: Callable[[], T]) -> T:
    """fn()'s result on rank 0, shared with every rank; if rank 0 refuses (SSLensError), every rank raises it
    instead of waiting for it at a barrier."""
    result, error = None, None
    if world == 1 or dist.get_rank() == 0:
        try:
            result = fn()
        except SSLensError as e:
            error = str(e)
    if world > 1:
        shared = [result, error]
        dist.broadcast_object_list(shared, src=0)
        result, error = shared
    if error is not None:
        raise SSLensError(error)
    return result


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def mean_over_ranks(value: Tensor, world: int, flag: Callable[[torch.device], Tensor]) -> tuple[Tensor, Tensor | None]:
    """The value's mean over ranks and, in the same reduction, the sum of every rank's `flag(device)` (None for a
    lone process, which reads its own flag)."""
    if world == 1:
        return value, None
    both = torch.stack([value, flag(value.device)])
    dist.all_reduce(both, op=dist.ReduceOp.SUM)
    return both[0] / world, both[1]
