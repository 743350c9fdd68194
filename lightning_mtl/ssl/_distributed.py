"""Collectives the SSL losses and evaluation callbacks need, as no-ops outside a process group."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def distributed_world_size() -> int:
    """Number of processes of the default group, 1 when no process group is running."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def differentiable_sum(tensor: Tensor, sync: bool) -> Tensor:
    """Sum of ``tensor`` over the ranks, with gradients: the backward pass all-reduces the incoming
    gradient too, so each rank's inputs receive the gradient of the global quantity.

    ``torch.distributed.all_reduce`` (not differentiable) would leave each rank with the gradient of its
    own term only; DDP's averaging would then divide the true gradient by the world size and drop the
    cross terms. With this sum, DDP's averaging of identical global gradients is exact.
    """
    if not sync:
        return tensor
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(tensor, op=dist.ReduceOp.SUM)


def gather_rows(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` ``[n_r, ...]`` of every rank along dim 0 (rank order), ranks may hold
    different ``n_r``; no gradient. Returns ``tensor`` itself outside a process group."""
    world = distributed_world_size()
    if world == 1:
        return tensor
    count = torch.tensor([tensor.shape[0]], device=tensor.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c.item()) for c in counts]
    longest = max(sizes)
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])


def sum_over_ranks(tensor: Tensor) -> Tensor:
    """All-reduce (sum) a copy of ``tensor``, no gradient; ``tensor`` itself outside a process group."""
    if distributed_world_size() == 1:
        return tensor
    tensor = tensor.clone()
    dist.all_reduce(tensor)
    return tensor


def max_over_ranks(tensor: Tensor) -> Tensor:
    """Element-wise maximum over the ranks of a copy of ``tensor``, no gradient."""
    if distributed_world_size() == 1:
        return tensor
    tensor = tensor.clone()
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor
