"""Mixture-of-experts surgery with enforced, sentence-level routing (one expert per domain)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

__all__ = ["EnforcedRoutingExperts", "moe_surgery", "routing"]

# (layer attribute that holds the feed-forward block(s), sibling that identifies the layout, layout name)
_LAYOUTS = (
    (("intermediate", "output"), "attention", "BERT / RoBERTa / MiniLM: `intermediate` + `output`"),
    (("mlp",), "mlp_norm", "ModernBERT: `mlp` beside `mlp_norm`"),
    (("ffn",), "output_layer_norm", "DistilBERT: `ffn` beside `output_layer_norm`"),
)


@dataclass(frozen=True)
class _Plan:
    """Where each expert's samples sit in the batch, worked out once per forward pass."""

    batch: int  # -1: one expert for any batch
    groups: tuple[tuple[int, int, int], ...]  # (expert, start, end) in the (sorted) batch
    order: Tensor | None  # None when the batch is already grouped by expert
    inverse: Tensor | None


class EnforcedRoutingExperts(nn.Module):
    """``num_experts`` copies of a feed-forward block; each sample goes through the copy its routing id names.

    Hallee et al., "Contrastive Learning and Mixture of Experts Enables Precise Vector Embeddings",
    arXiv 2401.15713, 2024 (the sentence-level enforced switch). Samples are grouped by expert so every
    token is computed by exactly one expert, in one call per expert present: contiguous slices when the
    batch is already sorted by expert (the pair collate sorts it), one gather and one scatter otherwise.
    Every tensor argument whose first dimension is the batch is split the same way.

    Args:
        block: the dense block; the experts are deep copies, so an untrained surgery computes what it did.
        num_experts: number of copies.
    """

    def __init__(self, block: nn.Module, num_experts: int) -> None:
        super().__init__()
        self.experts = nn.ModuleList(copy.deepcopy(block) for _ in range(num_experts))
        self.plan: _Plan | None = None

    def forward(self, *args: Any) -> Tensor:
        plan = self.plan
        if plan is None:
            raise RuntimeError(
                "a mixture-of-experts block ran without routing ids: call the model inside "
                "`with lightning_mtl.embeddings.routing(model, domain_ids):`"
            )
        first = args[0]
        if plan.batch >= 0 and first.shape[0] != plan.batch:
            raise RuntimeError(
                f"enforced routing got {plan.batch} routing ids but the block sees {first.shape[0]} rows "
                "(an unpadded / packed attention implementation flattens the batch: use 'sdpa' or 'eager')"
            )
        if len(plan.groups) == 1:
            return self.experts[plan.groups[0][0]](*args)
        if plan.order is not None:
            args = tuple(_rows(a, plan.batch, lambda t: t.index_select(0, plan.order)) for a in args)
        # one split per argument, not a slice per expert: a slice's backward writes its gradient into a
        # zero tensor of the whole batch (N of them summed per block), the split's backward one concatenation
        sizes = [end - start for _, start, end in plan.groups]
        parts = [_rows(a, plan.batch, lambda t: t.split(sizes), lambda v: [v] * len(sizes)) for a in args]
        outputs = [self.experts[expert](*(p[i] for p in parts)) for i, (expert, _, _) in enumerate(plan.groups)]
        joined = torch.cat(outputs)
        return joined if plan.inverse is None else joined.index_select(0, plan.inverse)


class _BertFeedForward(nn.Module):
    """BERT's feed-forward half as one block (``intermediate`` then ``output`` with its residual and norm),
    so that the batch is split once per layer, not twice."""

    def __init__(self, intermediate: nn.Module, output: nn.Module) -> None:
        super().__init__()
        self.intermediate, self.output = intermediate, output

    def forward(self, attention_output: Tensor) -> Tensor:
        return self.output(self.intermediate(attention_output), attention_output)


class _Passthrough(nn.Module):
    """Stands in for BERT's ``output`` once ``intermediate`` computes the whole feed-forward half."""

    def forward(self, layer_output: Tensor, attention_output: Tensor) -> Tensor:
        return layer_output


def _rows(value: Any, batch: int, take: Any, other: Any = lambda v: v) -> Any:
    """``take(value)`` for a tensor whose first dimension is the batch, else ``other(value)``."""
    return take(value) if isinstance(value, Tensor) and value.dim() and value.shape[0] == batch else other(value)


def moe_surgery(model: nn.Module, num_experts: int) -> nn.Module:
    """Turn every feed-forward block of a BERT-like encoder into ``num_experts`` copies with enforced routing.

    Works in place on BERT, RoBERTa and MiniLM layers (``intermediate`` and ``output``, joined into one
    block per expert: ``layer.intermediate`` then holds the experts and ``layer.output`` passes their result
    through), ModernBERT layers (``mlp``) and DistilBERT layers (``ffn``). Attention, embeddings and norms outside the blocks stay
    shared. Call the model inside :func:`routing` to say which expert each sample uses. Parameters of the
    blocks grow ``num_experts`` times; compute per token does not.

    Args:
        model: a Hugging Face encoder (or any module holding such layers).
        num_experts: copies per block (one per domain), at least 1.

    Returns:
        ``model`` itself, changed.

    Raises:
        ValueError: ``num_experts < 1``, a model already operated on, or a model with none of the layouts
            above (the message names the modules it looked for).
    """
    if int(num_experts) < 1:
        raise ValueError(f"num_experts must be at least 1, got {num_experts}")
    if any(isinstance(m, EnforcedRoutingExperts) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} already holds mixture-of-experts blocks: operate once")
    layers = []
    for layer in model.modules():
        for names, sibling, _ in _LAYOUTS:
            if isinstance(getattr(layer, sibling, None), nn.Module) and all(
                isinstance(getattr(layer, n, None), nn.Module) for n in names
            ):
                layers.append((layer, names))
                break
    if not layers:
        looked = "; ".join(text for _, _, text in _LAYOUTS)
        raise ValueError(f"moe_surgery found no feed-forward block in {type(model).__name__}: it looks for {looked}")
    for layer, names in layers:
        if names == ("intermediate", "output"):  # BERT's layer calls output(intermediate(x), x)
            block = _BertFeedForward(cast(nn.Module, layer.intermediate), cast(nn.Module, layer.output))
            layer.intermediate = EnforcedRoutingExperts(block, int(num_experts))
            layer.output = _Passthrough()
            continue
        setattr(layer, names[0], EnforcedRoutingExperts(getattr(layer, names[0]), int(num_experts)))
    return model


def _plan(ids: Tensor, num_experts: int) -> _Plan:
    if ids.dim() != 1:
        raise ValueError(f"routing ids must be one id per sample, [batch], got shape {tuple(ids.shape)}")
    ids = ids.long()
    low, high = (int(v) for v in torch.stack([ids.min(), ids.max()]).tolist()) if ids.numel() else (0, 0)
    if low < 0 or high >= num_experts:
        raise ValueError(f"routing id {low if low < 0 else high} is out of range for {num_experts} experts")
    counts = torch.bincount(ids, minlength=num_experts).tolist()  # the one host sync of a forward pass
    groups, start = [], 0
    for expert, count in enumerate(counts):
        if count:
            groups.append((expert, start, start + count))
            start += count
    if len(groups) <= 1 or bool((ids[1:] >= ids[:-1]).all()):
        return _Plan(len(ids), tuple(groups) or ((0, 0, 0),), None, None)
    order = torch.argsort(ids, stable=True)
    return _Plan(len(ids), tuple(groups), order, torch.argsort(order))


@contextmanager
def routing(model: nn.Module, ids: Tensor | int) -> Iterator[None]:
    """Route each sample of the forward passes inside the block to expert ``ids[i]`` (its domain).

    Args:
        model: a model changed by :func:`moe_surgery` (a model without experts ignores the routing).
        ids: ``[batch]`` integer expert ids, or one int for the whole batch.
    """
    blocks = [m for m in model.modules() if isinstance(m, EnforcedRoutingExperts)]
    if blocks:
        if isinstance(ids, int):
            plan = _Plan(-1, ((ids, 0, 0),), None, None)
            if not 0 <= ids < len(blocks[0].experts):
                raise ValueError(f"routing id {ids} is out of range for {len(blocks[0].experts)} experts")
        else:
            plan = _plan(ids, len(blocks[0].experts))
    try:
        for block in blocks:
            block.plan = plan
        yield
    finally:
        for block in blocks:
            block.plan = None
