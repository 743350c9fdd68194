"""The perturbation math of SAM and ASAM as small pure tensor functions (no Lightning, no optimizer):
the public perturbation API that the SAM optimizer, the SAM callback and F-MTL
(:mod:`lightning_mtl.multitask.fmtl`) build on.

SAM (Foret et al., ICLR 2021) climbs to ``w + e`` with ``e = rho * g / |g|``. ASAM (Kwon et al., ICML 2021)
measures the step in the coordinates of the normalization operator ``T_w``: ``e = rho * T^2 g / |T g|``.
Here ``T = |w| + eta`` element-wise, on every parameter (``eta`` keeps zero weights, e.g. freshly
initialized biases, perturbable). The official ASAM code applies ``|w| + eta`` to parameters whose name
contains ``weight`` and the identity to the others; pass ``adaptive`` as a per-parameter list of booleans
to reproduce that.

The norm is global: one scalar over all tensors given (as in both papers and their code), computed in
float32 whatever the gradients' dtype. ``None`` entries (parameters without a gradient) are skipped and
come back as ``None``.

    >>> import torch
    >>> w, g = [torch.tensor([3.0, 4.0])], [torch.tensor([3.0, 4.0])]
    >>> sam_perturbation(g, w, rho=0.5)[0]
    tensor([0.3000, 0.4000])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "adaptive_scale",
    "apply_perturbation",
    "perturbation_norm",
    "restore_parameters",
    "sam_perturbation",
]


def _flags(adaptive: bool | Sequence[bool], n: int) -> list[bool]:
    if isinstance(adaptive, bool):
        return [adaptive] * n
    flags = [bool(a) for a in adaptive]
    if len(flags) != n:
        raise ValueError(f"adaptive has {len(flags)} flags for {n} tensors")
    return flags


def adaptive_scale(param: Tensor, eta: float) -> Tensor:
    """ASAM's element-wise normalization operator ``T_w = |w| + eta`` (detached)."""
    return param.detach().abs().add(eta)


def _scaled(
    grads: Sequence[Tensor | None], params: Sequence[Tensor], adaptive: bool | Sequence[bool], eta: float
) -> list[Tensor | None]:
    """``T g`` for every tensor (``g`` itself where the flag is off)."""
    if len(grads) != len(params):
        raise ValueError(f"got {len(grads)} gradients for {len(params)} parameters")
    flags = _flags(adaptive, len(params))
    return [None if g is None else (g * adaptive_scale(p, eta) if a else g) for g, p, a in zip(grads, params, flags)]


def perturbation_norm(
    grads: Sequence[Tensor | None],
    params: Sequence[Tensor] | None = None,
    adaptive: bool | Sequence[bool] = False,
    eta: float = 0.0,
) -> Tensor:
    """The global norm ``|T g|`` (``|g|`` for SAM) as a float32 scalar on the first gradient's device."""
    if params is None:
        if adaptive is not False:
            raise ValueError("the adaptive (ASAM) norm needs the parameters")
        scaled = list(grads)
    else:
        scaled = _scaled(grads, params, adaptive, eta)
    present = [s for s in scaled if s is not None]
    if not present:
        raise ValueError("no gradients to take the norm of (every entry is None)")
    device = present[0].device
    norms = torch._foreach_norm(present) if hasattr(torch, "_foreach_norm") else [s.norm() for s in present]
    return torch.linalg.vector_norm(torch.stack([n.float().to(device) for n in norms]))


def sam_perturbation(
    grads: Sequence[Tensor | None],
    params: Sequence[Tensor],
    rho: float | Tensor,
    adaptive: bool | Sequence[bool] = False,
    eta: float = 0.0,
    eps: float = 1e-12,
) -> list[Tensor | None]:
    """The SAM (``adaptive=False``) or ASAM (``adaptive=True``) ascent step, one tensor per parameter.

    SAM: ``e = rho * g / (|g| + eps)``. ASAM: ``e = rho * T^2 g / (|T g| + eps)`` with ``T = |w| + eta``.
    The result has the parameters' dtypes; nothing is modified in place.

    Args:
        grads: the gradients at the current point (``None`` for parameters without one).
        params: the parameters, in the same order (ASAM reads their magnitudes).
        rho: radius of the neighbourhood (``|e| = rho`` for SAM, ``|T^-1 e| = rho`` for ASAM).
        adaptive: ASAM on every tensor (``True``), plain SAM (``False``), or one flag per tensor.
        eta: ASAM's offset in ``T = |w| + eta``.
        eps: added to the norm, so that a zero gradient gives a zero perturbation.
    """
    if float(rho) < 0:
        raise ValueError(f"rho must be >= 0, got {float(rho)}")
    scaled = _scaled(grads, params, adaptive, eta)
    norm = perturbation_norm(scaled)
    factor = rho / (norm + eps)
    flags = _flags(adaptive, len(params))
    present = [(i, s) for i, s in enumerate(scaled) if s is not None]
    index = [i for i, _ in present]
    # T (T g) = T^2 g for ASAM; one foreach multiply by the common factor (a 0-dim tensor, no device sync)
    ascent = [s * adaptive_scale(params[i], eta) if flags[i] else s for i, s in present]
    ascent = list(torch._foreach_mul(ascent, factor.to(ascent[0].device)))
    out: list[Tensor | None] = [None] * len(params)
    for i, e in zip(index, ascent):
        out[i] = e.to(params[i].dtype)
    return out


@torch.no_grad()
def apply_perturbation(params: Sequence[Tensor], perturbation: Sequence[Tensor | None]) -> list[Tensor | None]:
    """``w <- w + e`` in place; returns copies of the original values for :func:`restore_parameters`.

    Restoring from copies (not by subtracting ``e``) gives back the exact original bits, even when ``e``
    is not finite (a 16-mixed step with an overflowed gradient, which GradScaler then skips).
    """
    if len(params) != len(perturbation):
        raise ValueError(f"got {len(perturbation)} perturbation tensors for {len(params)} parameters")
    index = [i for i, e in enumerate(perturbation) if e is not None]
    targets = [params[i] for i in index]
    saved = [p.detach().clone() for p in targets]
    if targets:
        torch._foreach_add_(targets, [e for e in perturbation if e is not None])
    backup: list[Tensor | None] = [None] * len(params)
    for i, b in zip(index, saved):
        backup[i] = b
    return backup


@torch.no_grad()
def restore_parameters(params: Sequence[Tensor], backup: Sequence[Tensor | None]) -> None:
    """Copy the values saved by :func:`apply_perturbation` back into the parameters."""
    pairs = [(p, b) for p, b in zip(params, backup) if b is not None]
    if pairs:
        torch._foreach_copy_([p for p, _ in pairs], [b for _, b in pairs])
