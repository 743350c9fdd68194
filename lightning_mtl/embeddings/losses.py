"""Embedding losses, each a functional twin and a class: multiple-negatives ranking (MNR / InfoNCE), the
official ``mnr_plus`` of the mixture-of-experts embedding paper, and cosine-similarity regression.

The contrastive ones (``mnr``, ``mnr_plus``) are registered by name (:func:`create_loss`) so that a
:class:`~lightning_mtl.embeddings.BiEncoder` config can say ``loss: mnr_plus``; they take
``(anchors [B, D], positives [B, D], negatives [B, K, D] | None)``. Similarities are computed in float32
whatever the autocast dtype: a softmax over bf16 logits scaled by 20 loses most of its resolution.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CosineSimilarityLoss",
    "MNRLoss",
    "MNRPlusLoss",
    "cosine_similarity_loss",
    "create_loss",
    "list_losses",
    "mnr_loss",
    "mnr_plus_loss",
    "register_loss",
    "similarity_matrix",
]

Similarity = Literal["cosine", "dot"]

_REGISTRY: dict[str, type[nn.Module]] = {}
T = TypeVar("T", bound=type[nn.Module])


def register_loss(*names: str) -> Callable[[T], T]:
    """Class decorator: ``@register_loss("mnr", "infonce")``; the first name is the canonical one."""

    def wrap(cls: T) -> T:
        for name in names:
            if _REGISTRY.get(name.lower(), cls) is not cls:
                raise ValueError(f"loss name {name!r} is already registered to {_REGISTRY[name.lower()].__name__}")
            _REGISTRY[name.lower()] = cls
        cls.registry_name = names[0].lower()  # type: ignore[attr-defined]
        return cls

    return wrap


def list_losses() -> list[str]:
    """Canonical names of the registered contrastive losses, sorted."""
    return sorted({cls.registry_name for cls in _REGISTRY.values()})  # type: ignore[attr-defined]


def create_loss(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered contrastive loss from its name and keyword arguments."""
    try:
        cls = _REGISTRY[name.lower()]
    except KeyError:
        close = difflib.get_close_matches(name.lower(), list(_REGISTRY), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ValueError(f"unknown loss {name!r}; {hint}known losses: {', '.join(list_losses())}") from None
    return cls(**kwargs)


def similarity_matrix(a: Tensor, b: Tensor, similarity: Similarity = "cosine") -> Tensor:
    """``[N, D] x [M, D] -> [N, M]`` cosine similarities or raw dot products, in float32 (or float64)."""
    if similarity not in ("cosine", "dot"):
        raise ValueError(f"similarity must be 'cosine' or 'dot', got {similarity!r}")
    if a.dtype not in (torch.float32, torch.float64):
        a, b = a.float(), b.float()
    if similarity == "cosine":
        a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    return a @ b.T


def _check_pairs(anchors: Tensor, positives: Tensor, negatives: Tensor | None = None) -> None:
    if anchors.dim() != 2 or anchors.shape != positives.shape:
        raise ValueError(
            f"anchors and positives must both be [batch, dim], got {tuple(anchors.shape)} and {tuple(positives.shape)}"
        )
    if negatives is not None and (negatives.dim() != 3 or negatives.shape[::2] != anchors.shape):
        raise ValueError(
            f"negatives must be [batch, k, dim] with the anchors' batch {anchors.shape[0]} and dim "
            f"{anchors.shape[1]}, got {tuple(negatives.shape)}"
        )


def mnr_loss(
    anchors: Tensor,
    positives: Tensor,
    negatives: Tensor | None = None,
    scale: float = 20.0,
    similarity: Similarity = "cosine",
    symmetric: bool = False,
) -> Tensor:
    """Multiple-negatives ranking loss (InfoNCE with in-batch negatives, temperature ``1 / scale``).

    Row ``i``: cross-entropy of ``scale * sim(anchor_i, candidates)`` with target ``i``, where the
    candidates are every positive of the batch followed by every hard negative. ``symmetric`` averages
    it with the positives -> anchors direction (no hard negatives there), as sentence-transformers'
    ``directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction"``.

    Args:
        anchors: ``[B, D]`` embeddings.
        positives: ``[B, D]``, row ``i`` the positive of anchor ``i``.
        negatives: optional ``[B, K, D]`` hard negatives (``K`` per anchor), extra candidates for every anchor.
        scale: multiplies the similarities (sentence-transformers: 20 with cosine; 1 with raw dot products).
        similarity: ``"cosine"`` or ``"dot"``.
        symmetric: also rank the anchors for each positive, and average the two directions.

    Returns:
        The mean loss, a float32 scalar.
    """
    _check_pairs(anchors, positives, negatives)
    candidates = positives if negatives is None else torch.cat([positives, negatives.flatten(0, 1)])
    labels = torch.arange(anchors.shape[0], device=anchors.device)
    loss = F.cross_entropy(scale * similarity_matrix(anchors, candidates, similarity), labels)
    if symmetric:
        backward = F.cross_entropy(scale * similarity_matrix(positives, anchors, similarity), labels)
        loss = (loss + backward) / 2
    return loss


def mnr_plus_loss(anchors: Tensor, positives: Tensor, scale: float = 1.0, similarity: Similarity = "dot") -> Tensor:
    """The ``mnr_plus`` loss of the official code of Hallee et al. (arXiv 2401.15713).

    A symmetric cross-entropy over ``S = scale * sim(A, B)`` whose targets are not the diagonal but the
    argmax of the averaged within-side similarities ``(sim(A, A) + sim(B, B)) / 2`` (row-wise for
    ``A -> B``, on the transpose for ``B -> A``); they are usually the diagonal, and with cosine
    similarity always unless two rows coincide. The two directions are **summed** (the current official
    code; an older version halved the sum). Official defaults: raw dot products, no scale.

    Args:
        anchors: ``[B, D]`` embeddings.
        positives: ``[B, D]``, row ``i`` the positive of anchor ``i``.
        scale: multiplies the similarities of the logits.
        similarity: ``"dot"`` (official) or ``"cosine"`` (the code's ``normalize=True``).

    Returns:
        The mean over the rows of the two summed cross-entropies.
    """
    _check_pairs(anchors, positives)
    logits = scale * similarity_matrix(anchors, positives, similarity)
    with torch.no_grad():
        within = (
            similarity_matrix(anchors, anchors, similarity) + similarity_matrix(positives, positives, similarity)
        ) / 2
    return F.cross_entropy(logits, within.argmax(1)) + F.cross_entropy(logits.T, within.T.argmax(1))


def cosine_similarity_loss(a: Tensor, b: Tensor, target: Tensor) -> Tensor:
    """Mean squared error between ``cos(a_i, b_i)`` and ``target_i``: a bi-encoder regressing scores
    (a teacher's, for distillation; STS labels scaled to ``[-1, 1]``).

    Args:
        a: ``[B, D]`` embeddings.
        b: ``[B, D]`` embeddings.
        target: ``[B]`` scores.
    """
    if a.shape != b.shape or a.dim() != 2 or target.shape != a.shape[:1]:
        raise ValueError(
            f"cosine_similarity_loss needs a, b [batch, dim] and target [batch], got {tuple(a.shape)}, "
            f"{tuple(b.shape)} and {tuple(target.shape)}"
        )
    return F.mse_loss(F.cosine_similarity(a.float(), b.float(), dim=-1), target.float())


@register_loss("mnr", "infonce", "multiple_negatives_ranking")
class MNRLoss(nn.Module):
    """Multiple-negatives ranking loss (:func:`mnr_loss`) with its settings.

    Henderson et al., "Efficient Natural Language Response Suggestion for Smart Reply", 2017 (in-batch
    negatives); van den Oord et al., "Representation Learning with Contrastive Predictive Coding", 2018
    (InfoNCE). Defaults are sentence-transformers' ``MultipleNegativesRankingLoss``: cosine x 20.

    Args:
        scale: multiplies the similarities (1 / temperature).
        similarity: ``"cosine"`` or ``"dot"``.
        symmetric: average with the positives -> anchors direction.
    """

    def __init__(self, scale: float = 20.0, similarity: Similarity = "cosine", symmetric: bool = False) -> None:
        super().__init__()
        similarity_matrix(torch.zeros(1, 1), torch.zeros(1, 1), similarity)  # reject a bad name now
        self.scale, self.similarity, self.symmetric = scale, similarity, symmetric

    def forward(self, anchors: Tensor, positives: Tensor, negatives: Tensor | None = None) -> Tensor:
        return mnr_loss(anchors, positives, negatives, self.scale, self.similarity, self.symmetric)


@register_loss("mnr_plus")
class MNRPlusLoss(nn.Module):
    """The official ``mnr_plus`` loss (:func:`mnr_plus_loss`).

    Hallee et al., "Contrastive Learning and Mixture of Experts Enables Precise Vector Embeddings",
    arXiv 2401.15713, 2024 (official code: Gleghorn-Lab/Mixture-of-Experts-Sentence-Similarity).
    Hard negatives are not part of it: passing some is an error.

    Args:
        scale: multiplies the similarities of the logits.
        similarity: ``"dot"`` (official default) or ``"cosine"``.
    """

    def __init__(self, scale: float = 1.0, similarity: Similarity = "dot") -> None:
        super().__init__()
        similarity_matrix(torch.zeros(1, 1), torch.zeros(1, 1), similarity)
        self.scale, self.similarity = scale, similarity

    def forward(self, anchors: Tensor, positives: Tensor, negatives: Tensor | None = None) -> Tensor:
        if negatives is not None:
            raise ValueError("mnr_plus takes no hard negatives; use loss 'mnr' for batches with negatives")
        return mnr_plus_loss(anchors, positives, self.scale, self.similarity)


class CosineSimilarityLoss(nn.Module):
    """Cosine-similarity regression (:func:`cosine_similarity_loss`), the student loss of distilled
    sentence embeddings.

    Reimers & Gurevych, "Sentence-BERT: Sentence Embeddings using Siamese BERT-Networks", EMNLP 2019
    (the regression objective); Barkan et al., "Scalable Attentive Sentence-Pair Modeling via Distilled
    Sentence Embedding", AAAI 2020 (a bi-encoder regressing a cross-encoder's scores).
    """

    def forward(self, a: Tensor, b: Tensor, target: Tensor) -> Tensor:
        return cosine_similarity_loss(a, b, target)
