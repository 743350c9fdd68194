"""Every collective of the package, each a no-op outside a process group (floor 0: imports no family).

Modules call these instead of ``torch.distributed`` so that one place decides how tensors travel
between ranks: the SSL losses and evaluation callbacks, the multi-task DDP means, OVOR's feature
gather, the EMA teacher's buffer broadcast and the continual stream's rank lookup. Lightning's own
``trainer.strategy`` methods (``reduce``, ``broadcast`` of Python objects) stay where a strategy is at
hand; they dispatch on the strategy rather than talk to ``torch.distributed`` directly.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "broadcast_",
    "differentiable_sum",
    "distributed_rank",
    "distributed_world_size",
    "gather_rows",
    "gather_rows_with_grad",
    "gather_strided",
    "max_over_ranks",
    "mean_over_ranks_",
    "sum_over_ranks",
]


def _running() -> bool:
    return dist.is_available() and dist.is_initialized()


def distributed_world_size() -> int:
    """Number of processes of the default group, 1 when no process group is running."""
    return dist.get_world_size() if _running() else 1


def distributed_rank() -> int:
    """Rank of this process in the default group, 0 when no process group is running."""
    return dist.get_rank() if _running() else 0


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


def _row_counts(tensor: Tensor, world: int) -> list[int]:
    """``n_r`` of every rank, for a ``tensor`` ``[n_r, ...]`` on each."""
    count = torch.tensor([tensor.shape[0]], device=tensor.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    return [int(c.item()) for c in counts]


def _gather_padded(tensor: Tensor, sizes: list[int]) -> Tensor:
    """All-gather row blocks of the given sizes (padded to the longest: all_gather needs equal shapes)."""
    padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])


def gather_rows(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` ``[n_r, ...]`` of every rank along dim 0 (rank order), ranks may hold
    different ``n_r``; no gradient. Returns ``tensor`` itself outside a process group."""
    world = distributed_world_size()
    if world == 1:
        return tensor
    return _gather_padded(tensor, _row_counts(tensor, world))


class _GatherRowsWithGrad(torch.autograd.Function):
    """All-gather of row blocks whose backward sums the incoming gradients over the ranks."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, tensor: Tensor, sizes: list[int]) -> Tensor:
        rank = dist.get_rank()
        ctx.start = sum(sizes[:rank])  # type: ignore[attr-defined]
        ctx.size = sizes[rank]  # type: ignore[attr-defined]
        return _gather_padded(tensor, sizes)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        # every rank computes the loss of the whole gathered batch: the sum of their gradients, divided
        # again by DDP's average, is the gradient of that one loss
        grad = grad.clone(memory_format=torch.contiguous_format)  # autograd may share the incoming buffer
        dist.all_reduce(grad)
        return grad[ctx.start : ctx.start + ctx.size], None  # type: ignore[attr-defined]


def gather_rows_with_grad(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` ``[n_r, ...]`` of every rank along dim 0 (rank order), with gradients.

    Meant for a loss that every rank computes on the whole gathered batch (in-batch negatives from all
    ranks): the backward pass all-reduces (sums) the gradient of the gathered rows and hands each rank
    the rows it gave, so that after DDP's averaging the parameters hold the gradient of the loss on the
    concatenated batch. Ranks may hold different ``n_r``. Returns ``tensor`` itself outside a process group.
    """
    world = distributed_world_size()
    if world == 1:
        return tensor
    return _GatherRowsWithGrad.apply(tensor, _row_counts(tensor, world))


def gather_strided(tensor: Tensor, total: int) -> Tensor:
    """The ``total`` rows of a data set back in its order, from each rank's strided share.

    Rank ``r`` of ``w`` holds rows ``r, r + w, r + 2w, ...`` (``Subset(data, range(r, total, w))``, what
    ``DistributedSampler`` without shuffling gives), as ``tensor`` ``[n_r, ...]``; every rank receives the
    whole ``[total, ...]``. The trailing sizes may differ where a rank holds no rows (its ``[0, 0]``
    stand-in), so they are agreed first. No gradient; ``tensor`` itself outside a process group.
    """
    world = distributed_world_size()
    if world == 1:
        return tensor
    tail = tensor.shape[1:]
    if tensor.dim() == 2:  # an empty share may not know the feature width: take the largest
        width = int(max_over_ranks(torch.tensor(tensor.shape[1], device=tensor.device)))
        tail = torch.Size([width])
    # all_gather needs equal shapes: pad each share to ceil(total / world) rows; row i of rank r is
    # row r + i * world, so the gathered [world, m] grid read row-major over i is the data order
    m = -(-total // world)
    padded = tensor.new_zeros((m, *tail))
    if tensor.shape[0]:
        padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.stack(parts, dim=1).reshape(world * m, *tail)[:total]


def sum_over_ranks(tensor: Tensor) -> Tensor:
    """All-reduce (sum) a copy of ``tensor``, no gradient; ``tensor`` itself outside a process group."""
    if distributed_world_size() == 1:
        return tensor
    tensor = tensor.clone()
    dist.all_reduce(tensor)
    return tensor


def mean_over_ranks_(tensor: Tensor) -> Tensor:
    """Average ``tensor`` over the ranks in place (one all-reduce) and return it; untouched outside a
    process group."""
    world = distributed_world_size()
    if world == 1:
        return tensor
    dist.all_reduce(tensor)
    return tensor.div_(world)


def max_over_ranks(tensor: Tensor) -> Tensor:
    """Element-wise maximum over the ranks of a copy of ``tensor``, no gradient."""
    if distributed_world_size() == 1:
        return tensor
    tensor = tensor.clone()
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def broadcast_(tensors: Iterable[Tensor], src: int = 0) -> None:
    """Overwrite each tensor in place with rank ``src``'s copy; nothing outside a process group."""
    if distributed_world_size() == 1:
        return
    for tensor in tensors:
        dist.broadcast(tensor, src=src)
