"""Supervised contrastive loss (SupCon), the term that repairs prefix tuning under augmentation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SupConLoss", "supervised_contrastive_loss"]


def supervised_contrastive_loss(embeddings: Tensor, labels: Tensor, temperature: float = 0.1) -> Tensor:
    """SupCon's ``L_out``: for each anchor, the mean over its positives of ``-log softmax`` of the similarity.

    ``L = mean_{i: |P(i)| > 0} -1/|P(i)| sum_{p in P(i)} log( exp(s_ip) / sum_{a != i} exp(s_ia) )`` with
    ``s_ij = <z_i, z_j> / temperature`` on L2-normalised embeddings, ``P(i)`` the other samples of ``i``'s
    class. Augmented views of a sample are just more rows with the same label. An anchor alone in its class
    has no positive and is left out of the mean (the reference code divides by zero there); a batch without
    any positive pair gives 0. Each anchor's term is at least ``log |P(i)|``, reached when the positives
    coincide and the negatives carry no weight.

    Args:
        embeddings: ``[N, d]`` (not necessarily normalised).
        labels: ``[N]`` class ids.
        temperature: ``tau``.

    Returns:
        The scalar loss (float32 under mixed precision).
    """
    if embeddings.dim() != 2 or labels.shape != embeddings.shape[:1]:
        raise ValueError(
            f"embeddings must be [N, d] and labels [N], got {tuple(embeddings.shape)} and {tuple(labels.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = F.normalize(embeddings.float(), dim=-1)
    logits = z @ z.T / temperature
    self_mask = torch.eye(len(z), dtype=torch.bool, device=z.device)
    # the anchor itself is no candidate: -inf drops it from the softmax's denominator
    log_prob = torch.log_softmax(logits.masked_fill(self_mask, float("-inf")), dim=1)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    counts = positives.sum(1)
    has_positive = counts > 0
    # where() rather than a product: 0 * (-inf) on the diagonal would be NaN
    per_anchor = -torch.where(positives, log_prob, torch.zeros_like(log_prob)).sum(1) / counts.clamp_min(1)
    if not has_positive.any():  # a zero that keeps the graph (and a zero gradient), even for N = 1
        return embeddings.sum() * 0.0
    return per_anchor[has_positive].mean()


class SupConLoss(nn.Module):
    """Supervised contrastive loss as a module, optionally added to a cross-entropy with a weight.

    Khosla et al., "Supervised Contrastive Learning", NeurIPS 2020 (the ``L_out`` form); used with
    parameter-efficient tuning on augmented data by Obadinma, Guo and Zhu, "Effectiveness of Data
    Augmentation for Parameter Efficient Tuning with Limited Data", RepL4NLP 2023. See
    :func:`supervised_contrastive_loss`. Under DDP each rank contrasts its own batch.

    Args:
        temperature: ``tau`` of the similarities.
    """

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return supervised_contrastive_loss(embeddings, labels, self.temperature)
