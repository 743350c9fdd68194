"""TIES-merging: trim each task vector to its largest entries, elect a sign per entry, average the agreeing ones."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor

from lightning_mtl.merging.registry import Merge, register_merge
from lightning_mtl.merging.task_vector import TaskVector

__all__ = ["TIES", "kth_smallest_magnitude"]

# the signed integer type of each float's width: the bits of a non-negative float, read as that
# integer, sort as the floats do, so a radix select on the bits selects on the values
_BITS = {
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}
_DIGIT = 16  # bits resolved per pass: a 65 536-bin histogram
_CHUNK = 1 << 16  # entries per tensor handled at once: temporaries of a few MB, not of the largest tensor's size


def kth_smallest_magnitude(tensors: Sequence[Tensor], k: int) -> Tensor:
    """The ``k``-th smallest ``|x|`` (1-based) over all entries of ``tensors``, as ``kthvalue`` on their
    concatenation would return it, without concatenating them.

    A radix select on the bit patterns of ``|x|``: each pass builds a histogram of the next 16 bits of
    the entries still in the running, tensor by tensor, and keeps the bin that holds the ``k``-th entry
    (two passes for float32). Tensors are read in chunks: extra memory is a few MB, whatever their sizes.

    Args:
        tensors: floating-point tensors of one dtype (float16, bfloat16, float32 or float64).
        k: rank, ``1 <= k <=`` the total number of entries.
    """
    dtype = tensors[0].dtype
    if dtype not in _BITS or any(t.dtype != dtype for t in tensors):
        raise ValueError(
            f"kth_smallest_magnitude needs tensors of one floating dtype among {list(_BITS)}, got {sorted({str(t.dtype) for t in tensors})}"
        )
    total = sum(t.numel() for t in tensors)
    if not 1 <= k <= total:
        raise ValueError(f"k must lie in [1, {total}] (the number of entries), got {k}")
    int_dtype = _BITS[dtype]
    width = torch.finfo(dtype).bits
    prefix, remaining = 0, k
    for shift in range(width - _DIGIT, -1, -_DIGIT):
        hist = torch.zeros(1 << _DIGIT, dtype=torch.int64)
        for tensor in tensors:
            flat = tensor.detach().reshape(-1)
            for start in range(0, flat.numel(), _CHUNK):
                bits = flat[start : start + _CHUNK].abs().view(int_dtype)
                if shift + _DIGIT < width:  # only the entries whose higher bits match the chosen bins
                    bits = bits[(bits >> (shift + _DIGIT)) == prefix]
                hist += torch.bincount(((bits >> shift) & 0xFFFF).cpu(), minlength=1 << _DIGIT)
        cumulative = hist.cumsum(0)
        digit = int(torch.searchsorted(cumulative, remaining))  # the first bin reaching rank `remaining`
        remaining -= int(cumulative[digit - 1]) if digit else 0
        prefix = (prefix << _DIGIT) | digit
    return torch.tensor(prefix, dtype=torch.int64).to(int_dtype).view(dtype)


def _trimmed_block(parts: Sequence[Tensor], thresholds: Sequence[Tensor | None]) -> Tensor:
    """The ``[T, n]`` float32 block of ``parts`` with each row's entries below its threshold in magnitude
    zeroed (``None``: the row is kept whole)."""
    block = torch.stack([part.to(torch.float32) for part in parts])
    for row, threshold in zip(block, thresholds):
        if threshold is not None:
            row.mul_(row.abs() >= threshold.to(torch.float32))
    return block


def _kept(k_percent: float, numel: int) -> int:
    """The rank of the threshold in the official code: ``numel - int(numel * k)``; 0 keeps everything."""
    return numel - int(numel * (k_percent / 100))


@register_merge("ties", "ties_merging")
class TIES(Merge):
    """TIES-merging (Yadav et al., "TIES-Merging: Resolving Interference When Merging Models",
    NeurIPS 2023; official code prateeky2806/ties-merging).

    1. **Trim**: in each task vector keep the entries with ``|tau_t| >=`` the threshold, the
       ``(P - int(P * k / 100))``-th smallest magnitude (entries tied with it are kept, as ``kthvalue``
       and ``>=`` do in the official code; ``k = 100`` keeps everything).
    2. **Elect**: ``gamma = sign(sum_t trimmed tau_t)``; an entry whose sum is exactly zero gets the
       sign of the sum of all elected signs of the model (the majority); if that is zero as well the
       entry keeps sign 0, which the official selection reads as "negative".
    3. **Disjoint merge**: per entry, the trimmed ``tau_t`` whose sign agrees with ``gamma`` are
       averaged (``merge_func="mean"``, divided by their count, at least 1), summed (``"sum"``,
       FusionBench's default) or the largest magnitude is taken with sign ``gamma`` (``"max"``).

    ``scope="model"`` (the official code and the paper) finds one threshold per task over the whole
    vector; ``scope="tensor"`` one per tensor, which keeps ``k`` % of every layer (layers with small
    updates, e.g. normalisation, are not trimmed away wholesale). The official code stacks the ``T``
    flattened vectors into a ``T x P`` matrix (2.8 GB for 8 ViT-B/32); here everything streams tensor
    by tensor: the model-wide threshold comes from :func:`kth_smallest_magnitude` and the only
    model-sized allocation is the merged vector itself.

    Args:
        k: percentage of entries of each task vector kept, in ``(0, 100]`` (paper: 20).
        scope: ``"model"`` or ``"tensor"``: where the top-``k`` % is counted.
        merge_func: ``"mean"`` (the paper's disjoint mean), ``"sum"`` or ``"max"``.

    The merged model is ``theta_0 + lambda * tau_m``; the paper searches ``lambda`` in 0.8..2.5.
    """

    default_coef = 1.0

    def __init__(
        self,
        k: float = 20.0,
        scope: Literal["model", "tensor"] = "model",
        merge_func: Literal["mean", "sum", "max"] = "mean",
    ) -> None:
        if not 0 < k <= 100:
            raise ValueError(f"TIES k is the percentage of entries kept and must lie in (0, 100], got {k}")
        if scope not in ("model", "tensor"):
            raise ValueError(f"TIES scope must be 'model' or 'tensor', got {scope!r}")
        if merge_func not in ("mean", "sum", "max"):
            raise ValueError(f"TIES merge_func must be 'mean', 'sum' or 'max', got {merge_func!r}")
        self.k, self.scope, self.merge_func = k, scope, merge_func

    def thresholds(self, vectors: Sequence[Mapping[str, Tensor]]) -> list[dict[str, Tensor | None]]:
        """Per task and tensor the magnitude threshold of the trim (``None``: keep every entry)."""
        keys = list(vectors[0])
        out: list[dict[str, Tensor | None]] = []
        for vector in vectors:
            if self.scope == "model":
                rank = _kept(self.k, sum(vector[key].numel() for key in keys))
                tensors = [vector[key] for key in keys]
                if rank > 0 and len({t.dtype for t in tensors}) > 1:
                    tensors = [t.float() for t in tensors]
                value = kth_smallest_magnitude(tensors, rank) if rank > 0 else None
                out.append(dict.fromkeys(keys, value))
            else:
                per_tensor: dict[str, Tensor | None] = {}
                for key in keys:
                    flat = vector[key].detach().reshape(-1)
                    rank = _kept(self.k, flat.numel())
                    per_tensor[key] = flat.abs().kthvalue(rank).values if rank > 0 else None
                out.append(per_tensor)
        return out

    def merge(self, vectors: Sequence[Mapping[str, Tensor]]) -> TaskVector:
        thresholds = self.thresholds(vectors)
        merged: dict[str, Tensor] = {}
        undecided: dict[str, list[Tensor]] = {}  # flat indices whose trimmed sum is exactly zero, not all entries
        sign_total = torch.zeros((), dtype=torch.float64)
        for key in vectors[0]:
            flats = [vector[key].detach().reshape(-1) for vector in vectors]
            limits = [thresholds[t][key] for t in range(len(vectors))]
            out = torch.empty(flats[0].numel(), dtype=torch.float32)
            # a [T, chunk] block at a time: the official computation, on a few MB instead of T x P
            for start in range(0, out.numel(), _CHUNK):
                block = _trimmed_block([flat[start : start + _CHUNK] for flat in flats], limits)
                sign = torch.sign(block.sum(dim=0))
                sign_total += sign.sum(dtype=torch.float64)
                out[start : start + _CHUNK] = self._disjoint(block, sign)
                ties = ((sign == 0) & (block != 0).any(dim=0)).nonzero().squeeze(1)
                if ties.numel():
                    undecided.setdefault(key, []).append(ties + start)
            merged[key] = out.view(vectors[0][key].shape)
        majority = torch.sign(sign_total).to(torch.float32)
        if majority != 0:  # with a zero majority the official code leaves these entries at sign 0
            for key, pieces in undecided.items():
                index = torch.cat(pieces)
                block = _trimmed_block(
                    [vector[key].detach().reshape(-1)[index] for vector in vectors],
                    [thresholds[t][key] for t in range(len(vectors))],
                )
                merged[key].view(-1)[index] = self._disjoint(block, majority.expand(index.shape))
        return TaskVector._wrap(merged, torch.float32)

    def _disjoint(self, block: Tensor, sign: Tensor) -> Tensor:
        """The disjoint aggregate of the trimmed ``[T, n]`` block under the elected ``sign`` ``[n]``."""
        agree = torch.where(sign > 0, block > 0, block < 0)  # sign 0 selects the negative entries, as officially
        selected = block * agree
        if self.merge_func == "mean":
            return selected.sum(dim=0) / agree.sum(dim=0).clamp(min=1)
        if self.merge_func == "max":
            return selected.abs().amax(dim=0) * sign
        return selected.sum(dim=0)
