"""A faithful re-implementation of the official TIES-merging algorithm (prateeky2806/ties-merging): the
``T x P`` matrix of flattened task vectors, a per-row ``kthvalue`` threshold, sign election by mass with the
model-wide majority for zero sums, and the disjoint merge. The reference the streaming
:class:`~lightning_mtl.merging.TIES` is checked against (tests) and timed against (benchmarks/merging.py)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor


def official_ties(
    vectors: Sequence[Mapping[str, Tensor]], k: float = 20.0, merge_func: str = "mean"
) -> tuple[dict[str, Tensor], Tensor | None]:
    """The merged task vector (unflattened) and the per-task thresholds (``[T, 1]``; ``None`` for k = 100 %)."""
    keys = sorted(vectors[0])  # the official code sorts the state dict before flattening
    flat = torch.vstack([torch.nn.utils.parameters_to_vector([v[key].reshape(-1) for key in keys]) for v in vectors])
    checks = flat.clone()
    rows, numel = checks.shape
    rank = numel - int(numel * (k / 100))
    thresholds = None
    if rank == 0:  # the official kthvalue(0) would fail; everything is kept, as FusionBench's guard does
        trimmed = checks
    else:
        thresholds = checks.abs().kthvalue(rank, dim=1, keepdim=True).values
        trimmed = checks * (checks.abs() >= thresholds)
    sign = torch.sign(trimmed.sum(dim=0))
    sign[sign == 0] = torch.sign(sign.sum())
    keep = torch.where(sign.unsqueeze(0) > 0, trimmed > 0, trimmed < 0)
    selected = trimmed * keep
    if merge_func == "mean":
        merged = selected.sum(dim=0) / torch.clamp((selected != 0).sum(dim=0).float(), min=1)
    elif merge_func == "sum":
        merged = selected.sum(dim=0)
    else:
        merged = selected.abs().max(dim=0).values * sign
    out, start = {}, 0
    for key in keys:
        size = vectors[0][key].numel()
        out[key] = merged[start : start + size].reshape(vectors[0][key].shape)
        start += size
    return out, thresholds
