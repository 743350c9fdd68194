"""The training order of the pair data: a seeded shuffle per epoch, optionally bucketed by token length, this
rank's share under DDP, and a fast-forward for a run resumed inside an epoch."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DistributedSampler

__all__ = ["LengthBucketSampler"]


class LengthBucketSampler(DistributedSampler):
    """Sample indices for a loader of ``batch_size``: the order of an epoch depends only on ``(seed, epoch)``.

    Without ``lengths`` the order is the permutation of
    :class:`~lightning_mtl.datamodules.EpochShuffleSampler` (``torch.randperm`` seeded with ``seed + epoch``).
    With ``lengths`` (length bucketing, to cut padding) that permutation is cut into pools of ``pool`` global
    batches; each pool is sorted by length (stably) and cut into global batches of ``batch_size * world_size``
    samples of similar length; the full global batches of the epoch are then shuffled (seeded by ``seed`` and
    ``epoch``) and the last, partial one stays last. Randomness comes from the permutation and the batch
    order; the padding of a batch is that of its longest sample only.

    DDP: each rank takes the samples ``rank::world_size`` of the order (padded with its first samples to a
    multiple of ``world_size``, as ``DistributedSampler`` pads), so rank ``r``'s batch ``k`` is its share of
    global batch ``k``: disjoint shares of samples of similar length. It is a ``DistributedSampler``, so
    Lightning does not wrap it again.

    Resume: :meth:`skip` starts the next iteration of an epoch after its first ``batches`` batches (a run
    resumed inside that epoch sees the batches the uninterrupted run saw next).

    Args:
        num_samples: size of the data set.
        batch_size: samples per batch on each rank.
        lengths: a length per sample (tokens) for bucketing; ``None``: no bucketing.
        pool: global batches per sorted pool (larger: less padding, less randomness in a batch's company).
        seed: base seed of the permutation and of the batch order.
        rank: this process's rank; world_size: the number of processes.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        lengths: Sequence[int] | None = None,
        pool: int = 32,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1 or pool < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need batch_size >= 1, pool >= 1 and 0 <= rank < world_size, got {batch_size}, {pool}, {rank}, "
                f"{world_size}"
            )
        if lengths is not None and len(lengths) != num_samples:
            raise ValueError(f"lengths has {len(lengths)} entries for {num_samples} samples")
        super().__init__(range(num_samples), num_replicas=world_size, rank=rank, shuffle=False, seed=seed)  # type: ignore[arg-type]
        self.size, self.batch_size, self.pool = int(num_samples), int(batch_size), int(pool)
        self.lengths = None if lengths is None else np.asarray(lengths, dtype=np.int64)
        self.resume: tuple[int, int] | None = None  # (epoch, batches of it to skip)

    def order(self, epoch: int) -> list[int]:
        """The global order of ``epoch`` (all ranks' samples, before sharding)."""
        generator = torch.Generator()
        generator.manual_seed(self.seed + epoch)
        permutation = torch.randperm(self.size, generator=generator).numpy()
        if self.lengths is None:
            return permutation.tolist()
        width = self.batch_size * self.num_replicas
        batches: list[np.ndarray] = []
        for start in range(0, self.size, width * self.pool):
            chunk = permutation[start : start + width * self.pool]
            chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            batches.extend(chunk[i : i + width] for i in range(0, len(chunk), width))
        # every batch but a partial one (at most one: the last pool's longest tail) is full
        full = [b for b in batches if len(b) == width]
        partial = [b for b in batches if len(b) < width]
        shuffled = np.random.default_rng([self.seed, 1, epoch]).permutation(len(full))
        return [int(i) for k in shuffled for i in full[k]] + [int(i) for b in partial for i in b]

    def __iter__(self) -> Iterator[int]:
        indices = self.order(self.epoch)
        padding = self.total_size - len(indices)
        indices += (indices * (1 + padding // max(len(indices), 1)))[:padding]
        mine = indices[self.rank : self.total_size : self.num_replicas]
        start = 0
        if self.resume is not None and self.resume[0] == self.epoch:
            start = self.resume[1] * self.batch_size
        self.resume = None
        return iter(mine[start:])

    def skip(self, epoch: int, batches: int) -> None:
        """Start the next iteration of ``epoch`` after its first ``batches`` batches (a resumed run); an
        iteration of another epoch starts at its beginning."""
        self.epoch, self.resume = int(epoch), (int(epoch), int(batches))
