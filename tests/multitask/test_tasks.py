import math

import pytest
import torch
import torch.nn.functional as F

from lightning_mtl.multitask import MISSING_LABEL, BinaryTask, ClassificationTask, MultiLabelTask, RegressionTask
from lightning_mtl.multitask.tasks import TaskError


def test_classification_loss_skips_missing_labels():
    task = ClassificationTask(num_classes=4)
    pred = torch.randn(5, 4)
    target = torch.tensor([0, MISSING_LABEL, 3, -1, 2])
    keep = torch.tensor([0, 2, 4])
    expected = F.cross_entropy(pred[keep], target[keep])
    assert torch.allclose(task.loss(pred, task.check("t", pred, target)), expected)


def test_all_missing_gives_zero_loss_in_graph():
    task = ClassificationTask(num_classes=3)
    pred = torch.randn(4, 3, requires_grad=True)
    loss = task.loss(pred, torch.full((4,), MISSING_LABEL))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.count_nonzero(pred.grad) == 0


def test_classification_metrics_ignore_missing():
    task = ClassificationTask(num_classes=3)
    metrics = task.build_metrics()
    pred = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0]])
    task.update_metrics(metrics, pred, torch.tensor([0, 0, MISSING_LABEL]))
    assert metrics["acc"].compute().item() == pytest.approx(0.5)


def test_multilabel_masks_elementwise():
    task = MultiLabelTask(num_labels=3)
    pred = torch.randn(4, 3)
    target = torch.tensor([[1.0, 0, math.nan], [0, 1, 1], [math.nan, math.nan, 0], [1, 1, 1]])
    mask = ~torch.isnan(target)
    expected = F.binary_cross_entropy_with_logits(pred[mask], target[mask])
    assert torch.allclose(task.loss(pred, task.check("t", pred, target)), expected)
    metrics = task.build_metrics()
    task.update_metrics(metrics, torch.where(target.nan_to_num(0) > 0, 5.0, -5.0), target)
    assert metrics["acc"].compute().item() == pytest.approx(1.0)


def test_binary_accepts_flat_labels_and_integer_missing():
    task = BinaryTask()
    pred = torch.randn(3, 1)
    target = task.check("t", pred, torch.tensor([1, -1, 0]))
    expected = F.binary_cross_entropy_with_logits(pred[[0, 2], 0], torch.tensor([1.0, 0.0]))
    assert torch.allclose(task.loss(pred, target), expected)


def test_binary_and_multilabel_metrics_read_logits_as_logits():
    """Logits that all happen to lie in [0, 1] (0.3 is a positive prediction: sigmoid 0.57) must not be
    taken for probabilities; one label builds binary metrics (torchmetrics' multilabel ones need two)."""
    task = BinaryTask()
    metrics = task.build_metrics()
    logits = torch.tensor([[0.3], [0.2], [0.9], [0.1]])
    task.update_metrics(metrics, logits, task.check("t", logits, torch.tensor([1, 1, 1, -100])))
    assert metrics["acc"].compute().item() == pytest.approx(1.0)
    assert metrics["f1"].compute().item() == pytest.approx(1.0)
    multi = MultiLabelTask(num_labels=2)
    metrics = multi.build_metrics()
    multi.update_metrics(metrics, torch.tensor([[0.3, -0.2], [0.6, -1.0]]), torch.tensor([[1, 0], [1, 0]]))
    assert metrics["acc"].compute().item() == pytest.approx(1.0)


@pytest.mark.parametrize("kind", ["mse", "l1", "smooth_l1"])
def test_regression_masks_nan(kind):
    task = RegressionTask(out_features=2, loss=kind)
    pred = torch.randn(3, 2)
    target = torch.tensor([[1.0, math.nan], [0.5, 0.2], [math.nan, math.nan]])
    mask = ~torch.isnan(target)
    fn = {"mse": F.mse_loss, "l1": F.l1_loss, "smooth_l1": F.smooth_l1_loss}[kind]
    assert torch.allclose(task.loss(pred, task.check("t", pred, target)), fn(pred[mask], target[mask]))
    metrics = task.build_metrics()
    task.update_metrics(metrics, pred, target)
    assert metrics["mae"].compute().item() == pytest.approx((pred[mask] - target[mask]).abs().mean().item(), rel=1e-5)


def test_head_size_mismatch_names_task():
    task = ClassificationTask(num_classes=10)
    with pytest.raises(TaskError, match="task 'left'.*num_classes=10"):
        task.check("left", torch.randn(2, 7), torch.tensor([1, 2]))


def test_label_out_of_range_is_reported():
    task = ClassificationTask(num_classes=3)
    with pytest.raises(TaskError, match="label 7 is out of range"):
        task.check_values("digit", torch.tensor([0, 7]))


def test_regression_shape_mismatch():
    with pytest.raises(TaskError, match="do not match"):
        RegressionTask(out_features=2).check("depth", torch.randn(4, 2), torch.randn(4, 3))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_classification_loss_is_the_mean_over_labelled_samples_and_zero_without_any(smoothing):
    task = ClassificationTask(num_classes=4, label_smoothing=smoothing)
    pred = torch.randn(5, 4, requires_grad=True)
    target = torch.tensor([2, -1, 0, MISSING_LABEL, 3])
    kept = torch.tensor([0, 2, 4])
    expected = F.cross_entropy(pred[kept], target[kept], label_smoothing=smoothing)
    torch.testing.assert_close(task.loss(pred, target), expected)
    full = torch.tensor([2, 1, 0, 3, 3])  # no missing label: the plain mean
    torch.testing.assert_close(task.loss(pred, full), F.cross_entropy(pred, full, label_smoothing=smoothing))
    none = task.loss(pred, torch.full((5,), -1))
    assert none.item() == 0.0
    (grad,) = torch.autograd.grad(none, pred)
    assert torch.equal(grad, torch.zeros_like(pred))
    nan_logits = pred.detach().clone()
    nan_logits[0, 0] = math.nan
    assert torch.isnan(task.loss(nan_logits, target))  # a broken model still shows
