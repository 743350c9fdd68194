"""Mixup, CutMix, ResizeMix, the 3-sample linear mix, soft-target cross-entropy, and soft targets in
ClassificationTask: label mass sums to 1 and equals the pixel mass of every source."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_mtl.mixup._base import MixedBatch, mix_targets
from lightning_mtl.mixup.cutmix import CutMix
from lightning_mtl.mixup.linear3 import ThreeSampleMixup
from lightning_mtl.mixup.losses import soft_target_cross_entropy
from lightning_mtl.mixup.mixup import Mixup
from lightning_mtl.mixup.resizemix import ResizeMix
from lightning_mtl.multitask.tasks import ClassificationTask

MIXES = [Mixup(1.0), CutMix(1.0), ResizeMix(0.1, 0.8), ThreeSampleMixup(1.0)]


def _identity_images(batch: int, side: int = 12) -> torch.Tensor:
    """Image b has value 1 in channel b and 0 elsewhere: a mixed image's channel means are the shares
    of pixels that came from each sample."""
    return torch.eye(batch)[:, :, None, None].expand(batch, batch, side, side).contiguous()


@pytest.mark.parametrize("mix", MIXES, ids=lambda m: type(m).__name__)
@pytest.mark.parametrize("seed", range(5))
def test_label_mass_sums_to_one_and_equals_pixel_mass(mix, seed):
    torch.manual_seed(seed)
    batch = 6
    mixed, soft = mix(_identity_images(batch), torch.arange(batch), batch)
    assert soft.shape == (batch, batch)
    assert torch.allclose(soft.sum(1), torch.ones(batch), atol=1e-6)
    pixel_share = mixed.inputs.mean(dim=(2, 3))  # [B, sample]
    assert torch.allclose(pixel_share, soft, atol=1e-5)
    assert torch.allclose(mixed.weights.sum(1), torch.ones(batch), atol=1e-6)
    assert mixed.sources.shape == (batch, mix.num_sources)


def test_cutmix_box_is_one_rectangle_from_one_other_image():
    torch.manual_seed(3)
    batch = 4
    x = torch.arange(batch, dtype=torch.float)[:, None, None, None].expand(batch, 1, 16, 16).contiguous()
    mixed, _ = CutMix(1.0)(x, torch.arange(batch), batch)
    for b in range(batch):
        other = mixed.inputs[b, 0] != b
        if other.any():  # the pasted pixels form a filled rectangle of one source value
            rows, cols = other.any(1).nonzero(), other.any(0).nonzero()
            box = other[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
            assert box.all() and mixed.inputs[b, 0][other].unique().numel() == 1


def test_every_task_is_mixed_alike_and_missing_labels_stay_missing():
    torch.manual_seed(0)
    x = torch.randn(5, 3, 8, 8)
    targets = {
        "digit": torch.tensor([0, 1, 2, -100, 4]),
        "size": torch.tensor([0.5, 1.0, 2.0, 4.0, 8.0]),
        "attrs": torch.tensor([[0.0, 1.0]] * 5),
    }
    mixed, soft = Mixup(1.0)(x, targets, {"digit": 5, "size": None, "attrs": None})
    lam, perm = mixed.weights[0, 0], mixed.sources[:, 1]
    assert torch.allclose(soft["size"], lam * targets["size"] + (1 - lam) * targets["size"][perm])
    assert torch.allclose(soft["attrs"], targets["attrs"])
    onehot = F.one_hot(targets["digit"].clamp_min(0), 5)
    expected = lam * onehot + (1 - lam) * onehot[perm]
    missing = (targets["digit"] < 0) | (targets["digit"][perm] < 0)
    assert torch.isnan(soft["digit"][missing]).all()
    assert torch.allclose(soft["digit"][~missing], expected[~missing].float())
    with pytest.raises(ValueError, match="give its number of classes"):
        Mixup()(x, {"digit": targets["digit"]}, None)


def test_prob_zero_leaves_the_batch_alone_and_bad_arguments_fail():
    x = torch.randn(4, 3, 8, 8)
    mixed, soft = CutMix(prob=0.0)(x, torch.tensor([0, 1, 2, 3]), 4)
    assert torch.equal(mixed.inputs, x) and torch.equal(soft, torch.eye(4))
    with pytest.raises(ValueError, match="alpha must be positive"):
        Mixup(alpha=0)
    with pytest.raises(ValueError, match="images"):
        Mixup()(torch.randn(4, 8), torch.zeros(4, dtype=torch.long), 2)


def test_soft_target_cross_entropy_matches_torch_and_skips_missing_rows():
    torch.manual_seed(0)
    logits = torch.randn(6, 4)
    probs = torch.softmax(torch.randn(6, 4), 1)
    for smoothing in (0.0, 0.1):
        ours = soft_target_cross_entropy(logits, probs, smoothing)
        assert torch.allclose(ours, F.cross_entropy(logits, probs, label_smoothing=smoothing))
    probs[2] = float("nan")
    keep = torch.tensor([0, 1, 3, 4, 5])
    assert torch.allclose(soft_target_cross_entropy(logits, probs), F.cross_entropy(logits[keep], probs[keep]))
    all_missing = soft_target_cross_entropy(logits.requires_grad_(), torch.full_like(probs, float("nan")))
    assert all_missing.item() == 0.0 and all_missing.requires_grad


def test_classification_task_accepts_probability_targets():
    task = ClassificationTask(4, label_smoothing=0.1)
    logits = torch.randn(3, 4)
    hard = torch.tensor([0, 3, 1])
    soft = F.one_hot(hard, 4).float()
    assert task.check("t", logits, soft) is soft
    assert torch.allclose(task.loss(logits, soft), task.loss(logits, hard))  # one-hot rows = class indices
    mixture = torch.tensor([[0.7, 0.3, 0, 0], [0, 0, 0.4, 0.6], [float("nan")] * 4])
    assert torch.allclose(task.loss(logits, mixture), F.cross_entropy(logits[:2], mixture[:2], label_smoothing=0.1))
    metrics = task.build_metrics()
    task.update_metrics(metrics, F.one_hot(torch.tensor([0, 3, 2]), 4).float() * 5, mixture)
    assert float(metrics["acc"].compute()) == 1.0  # arg-max classes 0 and 3 right, the NaN row ignored
    task.check_values("t", mixture)  # no range error for probabilities
    with pytest.raises(Exception, match=r"probability rows \[3, 4\]"):
        task.check("t", logits, torch.rand(3, 5))


def test_mix_targets_of_an_earlier_mix_stay_probabilities():
    rows = torch.softmax(torch.randn(4, 3), 1)
    mixed = MixedBatch(torch.zeros(4, 1, 2, 2), torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0]]), torch.full((4, 2), 0.5))
    out = mix_targets(rows, mixed, 3)
    assert torch.allclose(out.sum(1), torch.ones(4)) and torch.allclose(out[0], (rows[0] + rows[1]) / 2)
