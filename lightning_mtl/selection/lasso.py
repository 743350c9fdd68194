"""Active source sampling via Lasso: per-source budgets set by the relevance of each source to the target.

The relevance vector ``nu`` expresses the target's head as a combination of the source heads on a
shared representation, ``w_0 ≈ W nu``. Wang, Chen, Jamieson & Du (ICML 2023) estimate it with the
Lasso and sample each source in proportion to ``|nu_m|`` (the ``nu1`` strategy); the earlier active
multi-task representation learning of Chen, Jamieson & Du (ICML 2022) samples in proportion to
``nu_m ** 2`` with an L2-regularised estimate (``nu2``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import Sampler

from lightning_mtl.selection.samplers import EpochForward, largest_remainder

__all__ = [
    "ActiveSourceSelection",
    "SourceBudgetSampler",
    "allocate_budgets",
    "estimate_relevance",
    "fit_linear_heads",
]

Strategy = Literal["nu1", "nu2", "uniform"]


def fit_linear_heads(features: np.ndarray, labels: np.ndarray, reg: float = 1.0) -> np.ndarray:
    """A linear head on frozen features by ridge regression (scikit-learn), with an intercept.

    Binary labels ``{0, 1}`` are regressed as ``±1`` and give a vector ``[k]``; ``C > 2`` classes are
    regressed one-hot (``±1``) and give the flattened ``[k * C]`` matrix, so heads of tasks with the same
    classes compare entry by entry.

    Args:
        features: ``[n, k]`` features of the labelled samples.
        labels: ``[n]`` class indices.
        reg: the ridge penalty (``alpha`` of ``sklearn.linear_model.Ridge``).
    """
    from sklearn.linear_model import Ridge

    labels = np.asarray(labels).astype(np.int64)
    classes = int(labels.max()) + 1 if len(labels) else 0
    if len(labels) != len(features) or classes < 1:
        raise ValueError(f"need one label per feature row, got {len(labels)} labels for {len(features)} rows")
    targets = 2.0 * (labels == 1) - 1.0 if classes <= 2 else 2.0 * np.eye(classes)[labels] - 1.0
    head = Ridge(alpha=float(reg), fit_intercept=True).fit(np.asarray(features, dtype=np.float64), targets)
    return np.asarray(head.coef_, dtype=np.float64).reshape(-1)


def estimate_relevance(
    source_heads: np.ndarray, target_head: np.ndarray, strategy: Strategy = "nu1", reg: float = 0.5
) -> np.ndarray:
    """The relevance ``nu`` with ``W nu ≈ w_0`` (columns of ``W`` = source heads).

    ``nu1`` solves the Lasso ``min (1 / (2k)) ||W nu - w_0||² + lam ||nu||_1`` (scikit-learn's scaling,
    ``k`` = rows of ``W``) with ``lam = reg * lam_max``, where ``lam_max = max |W^T w_0| / k`` is the
    smallest penalty that zeroes every entry: ``reg`` in ``(0, 1)`` keeps the largest entries whatever
    the scale of the heads. ``nu2`` solves the ridge problem ``min ||W nu - w_0||² + reg ||nu||²``
    with ``W`` and ``w_0`` divided by the mean column norm of ``W`` (least squares for ``reg=0``).
    ``uniform`` returns ones.

    Args:
        source_heads: ``[k, M]``, one source head per column.
        target_head: ``[k]``.
        strategy: ``"nu1"``, ``"nu2"`` or ``"uniform"``.
        reg: the L1 penalty as a fraction of ``lam_max`` (``nu1``) or the L2 penalty (``nu2``).
    """
    from sklearn.linear_model import Lasso, Ridge

    W, w0 = np.asarray(source_heads, dtype=np.float64), np.asarray(target_head, dtype=np.float64).reshape(-1)
    if W.ndim != 2 or W.shape[0] != w0.shape[0]:
        raise ValueError(f"source_heads must be [k, M] with k = len(target_head) = {w0.shape[0]}, got {W.shape}")
    if strategy == "uniform":
        return np.ones(W.shape[1])
    scale = float(np.linalg.norm(W, axis=0).mean())
    if scale > 0:
        W, w0 = W / scale, w0 / scale
    if strategy == "nu1":
        lam_max = float(np.abs(W.T @ w0).max()) / len(w0)
        if lam_max == 0:
            return np.zeros(W.shape[1])
        return Lasso(alpha=float(reg) * lam_max, fit_intercept=False, max_iter=100_000, tol=1e-10).fit(W, w0).coef_
    if strategy == "nu2":
        if reg == 0:
            return np.linalg.lstsq(W, w0, rcond=None)[0]
        return Ridge(alpha=float(reg), fit_intercept=False).fit(W, w0).coef_
    raise ValueError(f"strategy must be 'nu1', 'nu2' or 'uniform', got {strategy!r}")


def allocate_budgets(
    relevance: Sequence[float] | np.ndarray, total: int, strategy: Strategy = "nu1", explore: float = 0.0
) -> np.ndarray:
    """Integer per-source budgets summing to ``total``: ``∝ |nu|`` (``nu1``), ``∝ nu²`` (``nu2``) or equal.

    ``explore`` spreads that fraction of the budget evenly over all sources first (every source keeps
    being sampled); an all-zero relevance gives equal budgets.
    """
    if not 0.0 <= explore <= 1.0:
        raise ValueError(f"explore must be in [0, 1], got {explore}")
    nu = np.asarray(relevance, dtype=np.float64)
    if strategy == "nu1":
        weights = np.abs(nu)
    elif strategy == "nu2":
        weights = nu**2
    elif strategy == "uniform":
        weights = np.ones_like(nu)
    else:
        raise ValueError(f"strategy must be 'nu1', 'nu2' or 'uniform', got {strategy!r}")
    if weights.sum() <= 0:
        weights = np.ones_like(nu)
    mixed = (1.0 - explore) * weights / weights.sum() + explore / len(weights)
    return largest_remainder(mixed, int(total))


class SourceBudgetSampler(Sampler[list[int]]):
    """Batches of indices into concatenated sources, ``budgets[m]`` samples of source ``m`` per epoch.

    Each epoch draws ``budgets[m]`` samples of source ``m`` without replacement (a source's seeded
    permutations, wrapped into the next one when the budget exceeds its size), mixes the sources in a
    seeded order and cuts batches; the plan depends only on ``(seed, epoch, budgets)``. The total
    budget is fixed, so the epoch length stays what Lightning measured at the start; only its split
    changes (:meth:`set_budgets`). Under DDP rank ``r`` keeps the samples ``r::world_size`` of each
    global batch of ``batch_size * world_size`` (a last partial batch is padded from the epoch's start).

    Args:
        sizes: samples of each source.
        budgets: samples of each source per epoch (their sum is the epoch's size).
        batch_size: samples per batch on each rank.
        seed: seed of the draws; rank, world_size: the DDP process and their number.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        budgets: Sequence[int] | np.ndarray,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.sizes = np.asarray([int(n) for n in sizes], dtype=np.int64)
        if len(self.sizes) == 0 or (self.sizes <= 0).any():
            raise ValueError(f"every source needs at least one sample, got sizes {self.sizes.tolist()}")
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, {rank}, {world_size}")
        self.batch_size, self.seed, self.rank, self.world_size = int(batch_size), int(seed), int(rank), int(world_size)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])
        self.budgets = np.zeros(len(self.sizes), dtype=np.int64)
        self.set_budgets(budgets)
        self.total = int(self.budgets.sum())
        self.epoch = 0
        self.resume: tuple[int, int] | None = None  # (epoch, batches of it to skip): a resumed run
        self.sampler = EpochForward(self)  # where Lightning looks for set_epoch

    def set_budgets(self, budgets: Sequence[int] | np.ndarray) -> None:
        """The samples of each source from the next epoch on; their sum must stay the total."""
        values = np.asarray(budgets, dtype=np.int64).reshape(-1)
        if len(values) != len(self.sizes) or (values < 0).any() or values.sum() < 1:
            raise ValueError(
                f"budgets must be {len(self.sizes)} non-negative integers with a positive sum, got {values.tolist()}"
            )
        if hasattr(self, "total") and int(values.sum()) != self.total:
            raise ValueError(f"budgets must sum to the total {self.total}, got {int(values.sum())}")
        self.budgets = values

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every training epoch."""
        self.epoch = int(epoch)

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """The epoch's samples (indices into the concatenation) in training order, all ranks."""
        drawn = []
        for m, (size, budget) in enumerate(zip(self.sizes.tolist(), self.budgets.tolist())):
            passes = -(-budget // size)
            perms = [np.random.default_rng([self.seed, 3, epoch, m, k]).permutation(size) for k in range(passes)]
            drawn.append(np.concatenate(perms or [np.zeros(0, np.int64)])[:budget] + self.offsets[m])
        return np.random.default_rng([self.seed, 4, epoch]).permutation(np.concatenate(drawn))

    def __len__(self) -> int:
        return -(-self.total // (self.batch_size * self.world_size))

    def skip(self, epoch: int, batches: int) -> None:
        """Start the next iteration of ``epoch`` after its first ``batches`` batches (a resumed run); an
        iteration of another epoch starts at its beginning."""
        self.epoch, self.resume = int(epoch), (int(epoch), int(batches))

    def __iter__(self) -> Iterator[list[int]]:
        order = self.epoch_indices(self.epoch)
        size = self.batch_size * self.world_size
        first = self.resume[1] if self.resume is not None and self.resume[0] == self.epoch else 0
        self.resume = None
        for start in range(first * size, len(order), size):
            chosen = order[start : start + size]
            if len(chosen) % self.world_size:
                chosen = np.concatenate([chosen, np.resize(order, self.world_size - len(chosen) % self.world_size)])
            yield chosen[self.rank :: self.world_size].tolist()


class ActiveSourceSelection(Callback):
    """At each training epoch's end, estimate each source's relevance to the target and set the next budgets.

    The representation is the model's encoder, frozen for the estimate: the callback embeds each
    source's and the target's labelled estimation samples, fits a linear head per source and one for
    the target by ridge regression (:func:`fit_linear_heads`), solves ``w_0 ≈ W nu``
    (:func:`estimate_relevance`) and gives the next epoch ``total`` source samples split ``∝ |nu|``
    (:func:`allocate_budgets`). This is the L1-A-MTRL loop of Wang, Chen, Jamieson & Du, "Improved
    Active Multi-Task Representation Learning via Lasso" (ICML 2023); ``strategy="nu2"`` is the
    ``∝ nu²`` rule of Chen, Jamieson & Du, "Active Multi-Task Representation Learning" (ICML 2022), and
    ``"uniform"`` the passive baseline (the estimate is still computed and logged).

    The data module provides ``relevance_data()`` -> ``({source: (inputs, labels)}, (target inputs,
    target labels))`` and ``set_budgets(sequence)`` in the sources' order (as
    :class:`~lightning_mtl.selection.DigitsSources` does). Logged each epoch: ``selection/nu/<source>``
    and ``selection/budget/<source>``. Under DDP rank 0 computes the budgets and broadcasts them, so
    every rank samples by the same plan. The last relevance and budgets are saved in checkpoints.

    Args:
        strategy: ``"nu1"`` (Lasso, ``∝ |nu|``), ``"nu2"`` (ridge, ``∝ nu²``) or ``"uniform"``.
        reg: penalty of the relevance problem (see :func:`estimate_relevance`).
        head_reg: ridge penalty of the linear heads.
        explore: fraction of the budget spread evenly over all sources.
        features: maps a batch of inputs to features; by default ``pl_module.encoder``.
        batch_size: inputs per forward pass when embedding.
    """

    def __init__(
        self,
        strategy: Strategy = "nu1",
        reg: float = 0.5,
        head_reg: float = 1.0,
        explore: float = 0.0,
        features: Callable[[Tensor], Tensor] | None = None,
        batch_size: int = 512,
    ) -> None:
        if strategy not in ("nu1", "nu2", "uniform"):
            raise ValueError(f"strategy must be 'nu1', 'nu2' or 'uniform', got {strategy!r}")
        allocate_budgets([1.0], 1, strategy, explore)  # checks explore
        self.strategy, self.reg, self.head_reg, self.explore = strategy, float(reg), float(head_reg), float(explore)
        self.features, self.batch_size = features, int(batch_size)
        self.relevance: np.ndarray | None = None
        self.budgets: np.ndarray | None = None

    def _embed(self, pl_module: pl.LightningModule, inputs: Tensor) -> np.ndarray:
        encoder: Any = self.features or getattr(pl_module, "encoder", None)
        if encoder is None:
            raise AttributeError(
                f"{type(pl_module).__name__} has no `encoder`: give ActiveSourceSelection(features=...)"
            )
        modules = [m for m in (encoder, pl_module) if isinstance(m, nn.Module)]
        modes = [m.training for m in modules]
        for m in modules:
            m.eval()
        try:
            with torch.no_grad():
                parts = [
                    encoder(inputs[i : i + self.batch_size].to(pl_module.device)).float().flatten(1).cpu()
                    for i in range(0, len(inputs), self.batch_size)
                ]
        finally:
            for m, mode in zip(modules, modes):
                m.train(mode)
        return torch.cat(parts).numpy()

    def select(
        self, pl_module: pl.LightningModule, sources: Mapping[str, tuple[Tensor, Tensor]], target: tuple[Tensor, Tensor]
    ) -> np.ndarray:
        """The relevance ``nu`` of the sources (in their order) for the current encoder."""
        heads = [fit_linear_heads(self._embed(pl_module, x), y.numpy(), self.head_reg) for x, y in sources.values()]
        target_head = fit_linear_heads(self._embed(pl_module, target[0]), target[1].numpy(), self.head_reg)
        strategy: Strategy = "nu1" if self.strategy == "uniform" else self.strategy  # uniform still reports nu
        return estimate_relevance(np.stack(heads, axis=1), target_head, strategy, self.reg)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        datamodule = trainer.datamodule  # type: ignore[attr-defined]  # set by fit(datamodule=...)
        for attr in ("relevance_data", "set_budgets", "total_budget"):
            if not hasattr(datamodule, attr):
                raise AttributeError(
                    f"ActiveSourceSelection needs a data module with `{attr}` (like DigitsSources); "
                    f"got {type(datamodule).__name__}"
                )
        sources, target = datamodule.relevance_data()
        payload = None
        if trainer.global_rank == 0:
            nu = self.select(pl_module, sources, target)
            budgets = allocate_budgets(nu, datamodule.total_budget, self.strategy, self.explore)
            payload = (nu.tolist(), budgets.tolist())
        shared = trainer.strategy.broadcast(payload, src=0)
        assert shared is not None  # rank 0 always fills it
        nu_list, budget_list = shared
        self.relevance, self.budgets = np.asarray(nu_list), np.asarray(budget_list, dtype=np.int64)
        datamodule.set_budgets(self.budgets.tolist())
        logged = {f"selection/nu/{name}": float(v) for name, v in zip(sources, self.relevance)}
        logged |= {f"selection/budget/{name}": float(b) for name, b in zip(sources, self.budgets)}
        pl_module.log_dict(logged, on_step=False, on_epoch=True)

    def state_dict(self) -> dict[str, Any]:
        return {
            "relevance": None if self.relevance is None else self.relevance.tolist(),
            "budgets": None if self.budgets is None else self.budgets.tolist(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        relevance, budgets = state_dict.get("relevance"), state_dict.get("budgets")
        self.relevance = None if relevance is None else np.asarray(relevance)
        self.budgets = None if budgets is None else np.asarray(budgets, dtype=np.int64)
