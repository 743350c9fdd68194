"""Cross-entropy with soft (probability) targets (floor 0: imports no family).

Mixed samples carry probability rows; both the mixup family and the multi-task classification task
score them with :func:`soft_target_cross_entropy`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["soft_target_cross_entropy"]


def soft_target_cross_entropy(logits: Tensor, target: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Mean over samples of ``-sum_c p_c log softmax(logits)_c`` for probability rows ``p`` ``[B, C]``.

    Rows containing ``NaN`` (a missing label among the mixed samples) are left out; with none left, the
    result is 0, still attached to the graph. ``label_smoothing`` mixes ``p`` with the uniform
    distribution first, as :func:`torch.nn.functional.cross_entropy` does for probability targets. The
    loss is computed in float32 (safe under ``bf16-mixed``).
    """
    if logits.shape != target.shape:
        raise ValueError(f"soft targets of shape {tuple(target.shape)} do not match logits {tuple(logits.shape)}")
    valid = ~torch.isnan(target).any(dim=1)
    target = torch.where(valid[:, None], target, torch.zeros_like(target)).float()
    if label_smoothing:
        target = target * (1 - label_smoothing) + label_smoothing / target.shape[1]
    per_sample = -(target * F.log_softmax(logits.float(), dim=1)).sum(dim=1)
    count = valid.sum()
    total = torch.where(valid, per_sample, torch.zeros_like(per_sample)).sum()
    return torch.where(count > 0, total / count.clamp_min(1), logits.sum() * 0.0)
