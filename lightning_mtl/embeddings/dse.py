"""Distilled sentence embedding: a bi-encoder student with a pair head regressing a cross-encoder teacher's
pair scores (logits), so that pairs are scored from two independently computed sentence embeddings."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_mtl.embeddings.bi_encoder import BiEncoder

__all__ = ["DistilledSentenceEmbedding", "PairHead", "dse_loss", "pair_features"]

HeadType = Literal["concat", "dot"]


def pair_features(u: Tensor, v: Tensor, head: HeadType = "concat") -> Tensor:
    """The pair representation of two embedding batches ``[B, D]``: ``[u, v, u * v, |u - v|]`` (``[B, 4D]``,
    ``"concat"``) or the dot product ``[B, 1]`` (``"dot"``)."""
    if u.shape != v.shape or u.dim() != 2:
        raise ValueError(
            f"pair_features needs two [batch, dim] tensors of one shape, got {tuple(u.shape)}, {tuple(v.shape)}"
        )
    if head == "concat":
        return torch.cat([u, v, u * v, (u - v).abs()], dim=1)
    if head == "dot":
        return (u * v).sum(1, keepdim=True)
    raise ValueError(f"head must be 'concat' or 'dot', got {head!r}")


def dse_loss(student: Tensor, teacher: Tensor, labels: Tensor | None = None, distillation_coeff: float = 1.0) -> Tensor:
    """The distillation objective of DSE: squared error between the student's and the teacher's logits,
    summed over the outputs and averaged over the pairs; with ``labels`` and ``distillation_coeff < 1``,
    ``(1 - c) * cross_entropy(student, labels) + c * distillation``.

    Args:
        student: ``[B, C]`` (or ``[B]``) student logits.
        teacher: the teacher's logits, same shape.
        labels: ``[B]`` class ids, used when ``distillation_coeff < 1`` (needs ``C >= 2``).
        distillation_coeff: weight of the distillation term (the official default trains on it alone).

    Returns:
        A float32 (float64 for float64 inputs) scalar.
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f"student logits {tuple(student.shape)} and teacher scores {tuple(teacher.shape)} differ in shape"
        )
    # float32 at least: under bf16 autocast the squared error of close logits would round to zero
    wide = student.dtype if student.dtype == torch.float64 else torch.float32
    s, t = student.to(wide), teacher.to(wide)
    if s.dim() == 1:
        s, t = s[:, None], t[:, None]
    loss = (s - t).pow(2).sum(1).mean()
    if distillation_coeff < 1:
        if labels is None or s.shape[1] < 2:
            raise ValueError("distillation_coeff < 1 mixes in a cross-entropy: give integer labels and >= 2 outputs")
        loss = (1 - distillation_coeff) * F.cross_entropy(s, labels) + distillation_coeff * loss
    return loss


class PairHead(nn.Module):
    """An MLP over :func:`pair_features` (ReLU between the layers, none after the last), the student's
    pair scorer in DSE.

    Args:
        dim: embedding size.
        dims: the layer widths, the last one the number of outputs (the teacher's logits).
        head: ``"concat"`` (``[u, v, u*v, |u-v|]``) or ``"dot"``.
    """

    def __init__(self, dim: int, dims: Sequence[int] = (512, 1), head: HeadType = "concat") -> None:
        super().__init__()
        if head not in ("concat", "dot"):
            raise ValueError(f"head must be 'concat' or 'dot', got {head!r}")
        if not dims:
            raise ValueError("dims needs at least one width: the number of outputs")
        self.head = head
        widths = [4 * dim if head == "concat" else 1, *dims]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))

    def forward(self, u: Tensor, v: Tensor) -> Tensor:
        out = pair_features(u, v, self.head)
        for i, layer in enumerate(self.layers):
            out = layer(out)
            if i < len(self.layers) - 1:
                out = F.relu(out)
        return out


class DistilledSentenceEmbedding(BiEncoder):
    """A bi-encoder student whose pair head regresses a cross-encoder teacher's precomputed pair scores.

    Barkan et al., "Scalable Attentive Sentence-Pair Modeling via Distilled Sentence Embedding", AAAI 2020
    (official code: microsoft/Distilled-Sentence-Embedding). Both texts are embedded independently by the
    shared encoder (pooling / normalisation / projection of :class:`BiEncoder`); the head scores
    ``[u, v, u*v, |u-v|]`` with an MLP; the loss is :func:`dse_loss` against the teacher's logits
    (``batch["score"]``: ``[B]`` for one output, ``[B, C]`` for ``C``). The official code feeds the
    teacher's pre-softmax logits and sums the squared error over classes; give scores on that scale.

    Args:
        head_dims: widths of the head's layers, the last one the number of outputs.
        head: ``"concat"`` or ``"dot"`` (a plain dot product, then the layers).
        distillation_coeff: weight of the distillation term; below 1 mixes in cross-entropy on ``label``.
        **kwargs: the :class:`BiEncoder` arguments (``path`` / ``config``, ``pooling``, ``optimizer``...).
    """

    def __init__(
        self,
        head_dims: list[int] | None = None,
        head: HeadType = "concat",
        distillation_coeff: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.pair_head = PairHead(self.embedding_dim, head_dims or [512, 1], head)
        self.distillation_coeff = distillation_coeff
        self.num_outputs = (head_dims or [512, 1])[-1]

    def score_pairs(self, batch: dict[str, Any]) -> Tensor:
        """Student logits ``[B]`` (one output) or ``[B, C]`` for the batch's (anchor, positive) pairs."""
        anchors, positives, _ = self.embed_batch({k: v for k, v in batch.items() if k != "negative"})
        out = self.pair_head(anchors, positives)
        return out[:, 0] if self.num_outputs == 1 else out

    def batch_loss(self, batch: dict[str, Any]) -> Tensor:
        """:func:`dse_loss` of the batch's pairs against ``batch["score"]`` (per-pair: no gathering)."""
        if "score" not in batch:
            raise ValueError("a DistilledSentenceEmbedding batch needs teacher scores under 'score'")
        student = self.score_pairs(batch)
        teacher = batch["score"].to(student.device)
        if teacher.shape != student.shape:
            raise ValueError(
                f"teacher scores of shape {tuple(teacher.shape)} do not match the head's outputs "
                f"{tuple(student.shape)}: set head_dims' last width to the teacher's number of scores"
            )
        return dse_loss(student, teacher, batch.get("label"), self.distillation_coeff)
