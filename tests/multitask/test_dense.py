"""Dense tasks: losses and metrics against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_mtl.multitask.dense import AngleMedian, DepthTask, SegmentationTask, SurfaceNormalTask, angle_errors
from lightning_mtl.multitask.tasks import TaskError


def _compute(task, metrics):
    return {name: float(metric.compute()) for name, metric in metrics.items()}


def test_segmentation_miou_and_pixel_accuracy_by_hand():
    task = SegmentationTask(num_classes=3)
    metrics = task.build_metrics()
    # a 2x3 label map with one void pixel; the prediction is given as one-hot logits
    target = torch.tensor([[[0, 0, 1], [2, 2, -1]]])
    predicted = torch.tensor([[[0, 1, 1], [2, 0, 1]]])
    logits = F.one_hot(predicted, 3).permute(0, 3, 1, 2).float() * 5.0
    task.update_metrics(metrics, logits, task.check("seg", logits, target))
    values = _compute(task, metrics)
    # labelled pixels: (0->0) (0->1) (1->1) (2->2) (2->0); correct 3 of 5
    assert values["pixel_acc"] == pytest.approx(3 / 5)
    # IoU class 0: tp 1, pred 2, true 2 -> 1/3; class 1: tp 1, pred 2 (void pixel excluded), true 1 -> 1/2;
    # class 2: tp 1, pred 1, true 2 -> 1/2
    assert values["miou"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 2) / 3)


def test_segmentation_metrics_accumulate_over_batches_and_skip_absent_classes():
    task = SegmentationTask(num_classes=4)
    metrics = task.build_metrics()
    for target, predicted in ((torch.tensor([[[0, 1]]]), torch.tensor([[[0, 1]]])),
                              (torch.tensor([[[1, 1, 1]]]), torch.tensor([[[1, 0, 1]]]))):  # fmt: skip
        logits = F.one_hot(predicted, 4).permute(0, 3, 1, 2).float()
        task.update_metrics(metrics, logits, task.check("seg", logits, target))
    values = _compute(task, metrics)
    assert values["pixel_acc"] == pytest.approx(4 / 5)
    # class 0: tp 1, union 2 -> 1/2; class 1: tp 3, union 4 -> 3/4; classes 2, 3 never occur: left out
    assert values["miou"] == pytest.approx((1 / 2 + 3 / 4) / 2)


def test_segmentation_loss_is_cross_entropy_over_labelled_pixels_and_resizes():
    torch.manual_seed(0)
    task = SegmentationTask(num_classes=3)
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.randint(0, 3, (2, 4, 4))
    target[0, 0, :] = -1
    loss = task.loss(logits, task.check("seg", logits, target))
    log_p = torch.log_softmax(logits, 1)
    terms = [
        -log_p[b, target[b, i, j], i, j] for b in range(2) for i in range(4) for j in range(4) if target[b, i, j] >= 0
    ]
    assert loss.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-6)
    loss.backward()
    # a half-resolution prediction is upsampled to the label size first
    small = torch.randn(2, 3, 2, 2)
    expected = F.cross_entropy(F.interpolate(small, size=(4, 4), mode="bilinear"), target, ignore_index=-1)
    assert task.loss(small, target).item() == pytest.approx(expected.item(), rel=1e-6)
    # an all-void batch gives 0, not NaN
    assert task.loss(logits, torch.full_like(target, -1)).item() == 0.0


def test_segmentation_checks():
    task = SegmentationTask(num_classes=3)
    with pytest.raises(TaskError, match=r"\[batch, 3, height, width\]"):
        task.check("seg", torch.randn(2, 3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(TaskError, match="out of range"):
        task.check("seg", torch.randn(1, 3, 2, 2), torch.full((1, 2, 2), 3))
    # float label files (-1 void) become long labels
    labels = SegmentationTask(3).check("seg", torch.randn(1, 3, 1, 2), torch.tensor([[[2.0, -1.0]]]))
    assert labels.dtype == torch.long and labels.tolist() == [[[2, -1]]]
    with pytest.raises(ValueError, match="num_classes >= 2"):
        SegmentationTask(1)


def test_depth_errors_by_hand_skip_missing_pixels_and_pool_over_batches():
    task = DepthTask()
    metrics = task.build_metrics()
    pred1, true1 = torch.tensor([1.0, 2.0, 5.0, 9.0]), torch.tensor([2.0, 2.0, 4.0, 0.0])  # last: no reading
    pred2, true2 = torch.tensor([3.0]), torch.tensor([1.0])
    for pred, true in ((pred1, true1), (pred2, true2)):
        p, t = pred.view(1, 1, 1, -1), true.view(1, 1, -1)
        task.update_metrics(metrics, p, task.check("depth", p, t))
    values = _compute(task, metrics)
    # valid pixels: |1-2|=1, 0, |5-4|=1, |3-1|=2 -> abs 4/4; rel 1/2, 0, 1/4, 2/1 -> 2.75/4
    assert values["abs_err"] == pytest.approx(1.0)
    assert values["rel_err"] == pytest.approx(2.75 / 4)
    p, t = pred1.view(1, 1, 1, -1), true1.view(1, 1, 1, -1)
    assert task.loss(p, t).item() == pytest.approx(2 / 3)  # L1 over the three valid pixels
    assert metrics["abs_err"].higher_is_better is False and metrics["rel_err"].higher_is_better is False


def _normals_at_angles(degrees: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictions (scaled by 2: the task normalizes them) at the given angles to the true normal (0, 0, 1)."""
    theta = torch.deg2rad(torch.tensor(degrees))
    pred = torch.stack([torch.sin(theta), torch.zeros_like(theta), torch.cos(theta)]) * 2.0
    true = torch.zeros(3, len(degrees))
    true[2] = 1.0
    return pred.view(1, 3, 1, -1), true.view(1, 3, 1, -1)


def test_surface_normal_metrics_by_hand():
    task = SurfaceNormalTask()
    metrics = task.build_metrics()
    pred, true = _normals_at_angles([5.0, 10.0, 20.0, 25.0, 40.0, 70.0])
    true[..., -1] = 0.0  # the 70-degree pixel has no ground truth
    task.update_metrics(metrics, pred, task.check("normal", pred, true))
    values = _compute(task, metrics)
    assert values["mean_angle"] == pytest.approx(20.0, abs=1e-3)
    assert values["median_angle"] == pytest.approx(20.0, abs=0.01)
    assert values["within_11_25"] == pytest.approx(40.0)
    assert values["within_22_5"] == pytest.approx(60.0)
    assert values["within_30"] == pytest.approx(80.0)
    expected_loss = sum(1 - math.cos(math.radians(d)) for d in (5, 10, 20, 25, 40)) / 5
    assert task.loss(pred, true).item() == pytest.approx(expected_loss, rel=1e-5)
    directions = {name: bool(m.higher_is_better) for name, m in metrics.items()}
    assert directions == {"mean_angle": False, "median_angle": False, "within_11_25": True, "within_22_5": True,
                          "within_30": True}  # fmt: skip


def test_angle_median_even_count_and_opposite_normals():
    median = AngleMedian()
    median.update(torch.tensor([10.0, 20.0, 30.0, 40.0]))
    # an even count: the mean of the two middle values, as np.median (to within the 0.01-degree bins)
    assert float(median.compute()) == pytest.approx(25.0, abs=0.01)
    median.update(torch.tensor([12.5]))  # odd count now: the middle value
    assert float(median.compute()) == pytest.approx(20.0, abs=0.01)
    pred, true = _normals_at_angles([180.0])
    assert angle_errors(pred, true).item() == pytest.approx(180.0, abs=1e-3)


def test_dense_tasks_shape_errors():
    with pytest.raises(TaskError, match=r"\[batch, 1, height, width\]"):
        DepthTask().check("depth", torch.randn(2, 1, 4, 4), torch.randn(2, 3, 4, 4))
    with pytest.raises(TaskError, match="spatial map"):
        SurfaceNormalTask().check("normal", torch.randn(2, 3), torch.randn(2, 3, 4, 4))
