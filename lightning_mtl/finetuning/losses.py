"""Language-model losses on answer tokens: supervised fine-tuning (token cross-entropy) and DPO.

Convention (Hugging Face's): ``labels`` has the shape of ``input_ids``; a position holds the token the
model must produce there, or ``-100`` (prompt and padding, ignored). The logits at position ``t`` predict
the label at ``t + 1``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["IGNORE_INDEX", "answer_token_accuracy", "dpo_loss", "sequence_log_probs", "sft_loss"]

IGNORE_INDEX = -100


def _shifted(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on [batch, length]")
    return logits[:, :-1], labels[:, 1:]


def sft_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over the answer tokens of the batch (positions whose label is not -100).

    Args:
        logits: ``[B, L, V]``.
        labels: ``[B, L]`` answer tokens, -100 elsewhere.
    """
    logits, labels = _shifted(logits, labels)
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)


def answer_token_accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """Fraction of the answer tokens that the model's argmax predicts."""
    logits, labels = _shifted(logits, labels)
    keep = labels != IGNORE_INDEX
    hits = (logits.argmax(-1) == labels) & keep
    return hits.sum() / keep.sum().clamp_min(1)


def sequence_log_probs(logits: Tensor, labels: Tensor) -> Tensor:
    """``[B]`` sums of the answer tokens' log-probabilities, ``log pi(answer | prompt)``."""
    logits, labels = _shifted(logits, labels)
    keep = labels != IGNORE_INDEX
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    picked = log_probs.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (picked * keep).sum(-1)


def dpo_loss(
    policy_chosen: Tensor, policy_rejected: Tensor, reference_chosen: Tensor, reference_rejected: Tensor, beta: float
) -> Tensor:
    """Direct preference optimization, ``-log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))``, batch mean.

    Rafailov et al., "Direct Preference Optimization: Your Language Model is Secretly a Reward Model",
    NeurIPS 2023. Arguments are ``[B]`` sequence log-probabilities (:func:`sequence_log_probs`).
    """
    margin = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    return -F.logsigmoid(beta * margin).mean()
