"""Aligned-MTL: make the task gradients orthogonal with equal norms before summing them."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_mtl.aggregators._solvers import as_weights
from lightning_mtl.aggregators.base import GramianWeighting
from lightning_mtl.aggregators.registry import register_aggregator

__all__ = ["AlignedMTL", "balance_matrix"]


def balance_matrix(gramian: Tensor, scale_mode: str = "min", rank_tol: float | None = None) -> Tensor:
    """The ``m x m`` matrix ``B`` such that the rows of ``B J`` are the aligned task gradients.

    With ``G = V diag(lam) V^T`` (eigenvalues above ``rank_tol * max(lam) * m`` kept, the others
    dropped as rank deficiency), ``B = sqrt(lam_s) V diag(lam^-1/2) V^T`` where ``lam_s`` is the
    smallest kept eigenvalue (``scale_mode="min"``, the paper), their median or their mean
    (``"median"``, ``"rmse"``, as in the official code). Then
    ``(B J)(B J)^T = B G B = lam_s V_r V_r^T``: all non-zero singular values of the aligned
    Jacobian equal ``sqrt(lam_s)`` (condition number 1), and ``B J = sqrt(lam_s) U_r W_r^T`` for
    the thin SVD ``J = U diag(sigma) W^T`` (an orthogonal Procrustes solution).

    ``gramian`` is float64; ``rank_tol`` defaults to the float64 machine epsilon.
    """
    m = gramian.shape[0]
    if rank_tol is None:
        rank_tol = torch.finfo(gramian.dtype).eps
    lam, vec = torch.linalg.eigh(0.5 * (gramian + gramian.T))
    keep = lam > rank_tol * m * lam.max().clamp_min(0)
    safe = torch.where(keep, lam, torch.ones_like(lam))
    kept = torch.where(keep, lam, torch.full_like(lam, float("nan")))
    if scale_mode == "min":
        target = torch.where(keep, lam, torch.full_like(lam, float("inf"))).min()
    elif scale_mode == "median":
        target = kept.nanmedian()
    elif scale_mode == "rmse":
        target = kept.nanmean()
    else:
        raise ValueError(f"scale_mode must be 'min', 'median' or 'rmse', got {scale_mode!r}")
    target = torch.where(keep.any(), target, torch.zeros_like(target))
    factor = torch.where(keep, (target / safe).sqrt(), torch.zeros_like(lam))
    return (vec * factor) @ vec.T


@register_aggregator("aligned_mtl", "alignedmtl")
class AlignedMTL(GramianWeighting):
    """Independent component alignment (Aligned-MTL).

    Senushkin, D., Patakin, N., Kuznetsov, A. and Konushin, A. "Independent Component Alignment
    for Multi-Task Learning." CVPR 2023.

    The task gradients are replaced by the closest (Procrustes) set of orthogonal gradients whose
    norms all equal the smallest singular value of ``J`` (the "balance transformation", obtained
    from the eigendecomposition of ``G``, see :func:`balance_matrix`), so the linear system of
    gradients has condition number 1 and no task dominates; the update is the
    preference-weighted sum of the aligned gradients, ``d = (B J)^T p = J^T (B p)`` (``B`` is
    symmetric), i.e. the weights ``w = B p``.

    Notes:
        * ``p`` defaults to all ones: the official code sums the aligned gradients (torchjd uses
          ``1/m``, a scale factor of ``m``).
        * Eigenvalues below ``rank_tol * m * max(eig)`` are treated as rank deficiency, as in the
          official code, which uses the float32 machine epsilon; here ``rank_tol`` defaults to the
          epsilon of the dtype of the Gramian that is passed in (at least float32's), since a
          bf16/fp16 Gramian is only that accurate.
        * Applied to the Gramian of the gradients w.r.t. the shared representation it is the
          paper's Aligned-MTL-UB variant; that choice belongs to the engine.

    Args:
        pref_vector: preference weights ``p``, one per task (default all ones).
        scale_mode: ``"min"`` (default, the paper), ``"median"`` or ``"rmse"`` (official code).
        rank_tol: relative eigenvalue threshold (see Notes); ``None`` uses the input's epsilon.
    """

    def __init__(
        self, pref_vector: Sequence[float] | None = None, scale_mode: str = "min", rank_tol: float | None = None
    ) -> None:
        super().__init__()
        if scale_mode not in ("min", "median", "rmse"):
            raise ValueError(f"AlignedMTL scale_mode must be 'min', 'median' or 'rmse', got {scale_mode!r}")
        self.pref_vector = None if pref_vector is None else [float(p) for p in pref_vector]
        self.scale_mode = scale_mode
        self.rank_tol = rank_tol

    def forward(self, gramian: Tensor) -> Tensor:
        m = gramian.shape[0]
        tol = self.rank_tol
        if tol is None:
            in_dtype = gramian.dtype if gramian.dtype in (torch.float16, torch.bfloat16) else torch.float32
            tol = torch.finfo(in_dtype).eps
        g = gramian.detach().to(torch.float64)
        scale = g.diagonal().mean()
        g = g / torch.where(scale > 0, scale, torch.ones_like(scale))  # B is scale-invariant
        b = balance_matrix(g, self.scale_mode, tol)
        if self.pref_vector is None:
            pref = torch.ones(m, dtype=g.dtype, device=g.device)
        else:
            if len(self.pref_vector) != m:
                raise ValueError(f"AlignedMTL has {len(self.pref_vector)} preference weights but there are {m} tasks")
            pref = torch.tensor(self.pref_vector, dtype=g.dtype, device=g.device)
        return as_weights(b @ pref, gramian)

    def hparams_for_repr(self) -> dict[str, object]:
        return {"pref_vector": self.pref_vector, "scale_mode": self.scale_mode}
