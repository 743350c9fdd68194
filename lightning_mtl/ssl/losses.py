"""Barlow Twins and Mixed Barlow Twins losses, correct under DDP.

Notation (per embedding dimension, over the *global* batch of ``N`` samples, all ranks together):
``Z_A``, ``Z_B`` the standardized embeddings of the two augmented views, ``C = Z_A^T Z_B / N`` their
cross-correlation.

* Barlow Twins (Zbontar et al., ICML 2021):
  ``L_BT = sum_i (1 - C_ii)^2 + lambda_BT sum_{i != j} C_ij^2``.
* Mixed Barlow Twins (Bandara et al., "Guarding Barlow Twins Against Overfitting with Mixed Samples"):
  with ``Y_M = alpha Y_A + (1 - alpha) Y_B[pi]`` and ``Z_M`` its standardized embedding,
  ``C_MA = Z_M^T Z_A / N``, ``C_MB = Z_M^T Z_B / N`` and the targets that linear interpolation implies,
  ``C_MA* = (alpha Z_A^T Z_A + (1 - alpha) Z_B[pi]^T Z_A) / N`` and
  ``C_MB* = (alpha Z_A^T Z_B + (1 - alpha) Z_B[pi]^T Z_B) / N``;
  ``L_reg = lambda_reg lambda_BT (|C_MA - C_MA*|_F^2 + |C_MB - C_MB*|_F^2)``.

  ``C_MB*`` is the formula of the paper's README and of the official CIFAR / STL-10 / Tiny-ImageNet script;
  the official ImageNet script uses ``alpha Z_B^T Z_B`` for the first term. We keep the README form: it is
  what ``Z_M ~ alpha Z_A + (1 - alpha) Z_B[pi]`` implies for ``Z_M^T Z_B`` (the ImageNet form assumes
  ``Z_A ~ Z_B`` in one term only), it is symmetric with ``C_MA*``, and it is the form of the published
  CIFAR / STL-10 / Tiny-ImageNet numbers that our recipes follow.

  Both differences share one factor: ``C_MA - C_MA* = R^T Z_A / N`` and ``C_MB - C_MB* = R^T Z_B / N`` with
  ``R = Z_M - alpha Z_A - (1 - alpha) Z_B[pi]``, so the regularizer costs two ``d x d`` products instead
  of six. The targets are not detached (as in the official code).

Standardization uses the unbiased standard deviation (``torch.std``, as the official CIFAR script) of the
global batch. Under DDP (``sync=True``, the default whenever a process group with more than one rank is
running) the per-dimension sums and the cross-correlations are summed over the ranks with a
*differentiable* all-reduce, so the loss is the loss of the concatenated batch on every rank and, after
DDP's gradient averaging, the gradients equal the single-process gradients on that batch. The permutation
``pi`` pairs samples within each rank's own batch (as the official code), i.e. on the concatenated batch
it is block-diagonal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_mtl._distributed import differentiable_sum, distributed_world_size, sum_over_ranks

__all__ = [
    "BarlowTwinsLossTerms",
    "barlow_twins_loss",
    "cross_correlation",
    "mixed_barlow_twins_loss",
    "mixed_targets",
    "standardize",
]


@dataclass
class BarlowTwinsLossTerms:
    """The parts of a (Mixed) Barlow Twins loss; ``loss = loss_bt + loss_reg``."""

    loss: Tensor
    loss_bt: Tensor
    on_diag: Tensor
    off_diag: Tensor
    loss_reg: Tensor


def _resolve_sync(sync: bool | None) -> bool:
    return distributed_world_size() > 1 if sync is None else bool(sync)


def _global_count(n: int, sync: bool, device: torch.device) -> Tensor:
    count = torch.tensor(float(n), device=device)
    return sum_over_ranks(count) if sync else count


def standardize(views: Tensor, sync: bool | None = None, eps: float = 1e-8, count: Tensor | None = None) -> Tensor:
    """Standardize embeddings per dimension over the (global) batch.

    Args:
        views: ``[n, d]`` or stacked views ``[V, n, d]`` (one mean / std per view and dimension).
        sync: sum the statistics over the DDP ranks (default: when a process group is running).
        eps: added to the variance (a dimension with zero variance becomes 0 instead of NaN).
        count: the global batch size, when the caller has it already (saves a reduction).

    Returns:
        ``(z - mean) / sqrt(var + eps)`` with the unbiased variance of the global batch, same shape.
    """
    sync = _resolve_sync(sync)
    single = views.dim() == 2
    z = views.unsqueeze(0) if single else views
    n = count if count is not None else _global_count(z.shape[1], sync, z.device)
    if n < 2:
        raise ValueError(f"Barlow Twins standardizes over the batch and needs at least 2 samples, got {int(n)}")
    mean = differentiable_sum(z.sum(1), sync) / n
    centered = z - mean.unsqueeze(1)
    var = differentiable_sum(centered.square().sum(1), sync) / (n - 1)
    out = centered / torch.sqrt(var + eps).unsqueeze(1)
    return out.squeeze(0) if single else out


def cross_correlation(z_a: Tensor, z_b: Tensor, sync: bool | None = None, count: Tensor | None = None) -> Tensor:
    """``Z_A^T Z_B / N`` over the global batch (standardize first). ``[d_a, d_b]``."""
    sync = _resolve_sync(sync)
    n = count if count is not None else _global_count(z_a.shape[0], sync, z_a.device)
    return differentiable_sum(z_a.T @ z_b, sync) / n


def _bt_terms(c: Tensor, lambda_bt: float) -> tuple[Tensor, Tensor, Tensor]:
    diag = torch.diagonal(c)
    on_diag = (1 - diag).square().sum()
    off_diag = c.square().sum() - diag.square().sum()
    return on_diag + lambda_bt * off_diag, on_diag, off_diag


def _float32(*tensors: Tensor) -> list[Tensor]:
    return [t.float() for t in tensors]


def barlow_twins_loss(
    z_a: Tensor, z_b: Tensor, lambda_bt: float = 1 / 128, sync: bool | None = None, eps: float = 1e-8
) -> BarlowTwinsLossTerms:
    """Barlow Twins loss of the raw (projector) embeddings ``z_a``, ``z_b`` ``[n, d]`` (this rank's part).

    Computed in float32 (outside autocast). See the module docstring for the formula and DDP behaviour.

    Examples:
        >>> z = torch.randn(64, 16)
        >>> terms = barlow_twins_loss(z, z + 0.1 * torch.randn(64, 16), lambda_bt=1 / 16)
        >>> bool(terms.loss > 0), float(terms.loss_reg)
        (True, 0.0)
    """
    sync = _resolve_sync(sync)
    with torch.autocast(z_a.device.type, enabled=False):
        z_a, z_b = _float32(z_a, z_b)
        n = _global_count(z_a.shape[0], sync, z_a.device)
        za, zb = standardize(torch.stack([z_a, z_b]), sync, eps, count=n)
        c = cross_correlation(za, zb, sync, count=n)
        loss, on_diag, off_diag = _bt_terms(c, lambda_bt)
    zero = loss.new_zeros(())
    return BarlowTwinsLossTerms(loss=loss, loss_bt=loss, on_diag=on_diag, off_diag=off_diag, loss_reg=zero)


def mixed_targets(za: Tensor, zb: Tensor, alpha: float, perm: Tensor) -> tuple[Tensor, Tensor]:
    """The target cross-correlations ``(C_MA*, C_MB*)`` of standardized ``za``, ``zb`` (one process).

    The direct form of the formula, kept for reference and tests; the loss uses the cheaper factored form.
    """
    n = za.shape[0]
    zb_pi = zb[perm]
    c_ma = (alpha * za.T @ za + (1 - alpha) * zb_pi.T @ za) / n
    c_mb = (alpha * za.T @ zb + (1 - alpha) * zb_pi.T @ zb) / n
    return c_ma, c_mb


def mixed_barlow_twins_loss(
    z_a: Tensor,
    z_b: Tensor,
    z_m: Tensor,
    alpha: float,
    perm: Tensor,
    lambda_bt: float = 1 / 128,
    lambda_reg: float = 4.0,
    sync: bool | None = None,
    eps: float = 1e-8,
) -> BarlowTwinsLossTerms:
    """Barlow Twins loss plus the mixed-sample regularizer (Bandara et al.).

    Args:
        z_a: raw embedding of the first view ``[n, d]`` (this rank's part of the batch).
        z_b: raw embedding of the second view ``[n, d]``.
        z_m: raw embedding of the mixed input ``alpha * y_a + (1 - alpha) * y_b[perm]``.
        alpha: the mixing coefficient of this batch (the same on every rank).
        perm: this rank's permutation of ``range(n)`` used to build the mixed input.
        lambda_bt: weight of the off-diagonal terms.
        lambda_reg: weight of the regularizer relative to ``lambda_bt``; 0 gives plain Barlow Twins.
        sync: reduce over the DDP ranks (default: when a process group is running).
        eps: added to the variances of the standardization.

    Returns:
        the terms; ``loss_reg`` is the weighted regularizer, ``loss = loss_bt + loss_reg``.
    """
    sync = _resolve_sync(sync)
    with torch.autocast(z_a.device.type, enabled=False):
        z_a, z_b, z_m = _float32(z_a, z_b, z_m)
        n = _global_count(z_a.shape[0], sync, z_a.device)
        za, zb, zm = standardize(torch.stack([z_a, z_b, z_m]), sync, eps, count=n)
        residual = zm - alpha * za - (1 - alpha) * zb[perm]
        d = za.shape[1]
        # one reduction for [C_AB | C_MA - C_MA* | C_MB - C_MB*]
        local = torch.cat([za.T @ zb, residual.T @ torch.cat([za, zb], dim=1)], dim=1)
        stacked = differentiable_sum(local, sync) / n
        c, diff = stacked[:, :d], stacked[:, d:]
        loss_bt, on_diag, off_diag = _bt_terms(c, lambda_bt)
        loss_reg = lambda_reg * lambda_bt * diff.square().sum()
    return BarlowTwinsLossTerms(
        loss=loss_bt + loss_reg, loss_bt=loss_bt, on_diag=on_diag, off_diag=off_diag, loss_reg=loss_reg
    )
