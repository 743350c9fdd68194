import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_mtl import ClassificationTask, MultiTaskModule, RegressionTask
from lightning_mtl.multitask.tasks import TaskError
from tests.fixtures.trainers import tiny_module, tiny_multidigits, tiny_trainer


def _batch(n=6):
    return torch.randn(n, 1, 10, 10), {"left": torch.randint(0, 10, (n,)), "right": torch.randint(0, 10, (n,))}


def test_forward_gives_one_output_per_task():
    module = tiny_module()
    out = module(_batch()[0])
    assert set(out) == {"left", "right"} and all(v.shape == (6, 10) for v in out.values())


def test_training_objective_is_weighted_sum_of_task_losses():
    module = tiny_module(
        tasks={"left": ClassificationTask(10, weight=0.3), "right": ClassificationTask(10, weight=2.0)}
    )
    module.eval()  # fixed BatchNorm statistics, so forward passes agree
    x, y = _batch()
    loss = module.training_step((x, y), 0)
    out = module(x)
    expected = 0.3 * F.cross_entropy(out["left"], y["left"]) + 2.0 * F.cross_entropy(out["right"], y["right"])
    assert torch.allclose(loss, expected, atol=1e-6)


def test_explicit_weights_override_task_weights():
    from lightning_mtl.aggregators import LinearScalarization

    module = tiny_module(aggregator=LinearScalarization([1.0, 0.0]))
    module.eval()
    x, y = _batch()
    assert torch.allclose(module.training_step((x, y), 0), F.cross_entropy(module(x)["left"], y["left"]), atol=1e-6)


def test_single_task_accepts_bare_label_tensor():
    module = tiny_module(tasks={"digit": ClassificationTask(10)})
    x, y = _batch()
    assert torch.isfinite(module.training_step((x, y["left"]), 0))


def test_missing_labels_for_a_task_is_clear():
    module = tiny_module()
    x, y = _batch()
    with pytest.raises(KeyError, match="no labels for task 'right'"):
        module.training_step((x, {"left": y["left"]}), 0)


def test_unknown_task_name_fails_at_setup():
    module = tiny_module(tasks={"left": ClassificationTask(10), "middle": ClassificationTask(10)})
    with pytest.raises(ValueError, match=r"unknown task name\(s\) \['middle'\].*left, right"):
        tiny_trainer(fast_dev_run=True).fit(module, datamodule=tiny_multidigits())


def test_head_mismatch_fails_with_task_name():
    module = tiny_module(tasks={"left": ClassificationTask(10), "right": ClassificationTask(10, head=nn.Linear(32, 7))})
    with pytest.raises(TaskError, match="task 'right'"):
        tiny_trainer(fast_dev_run=True).fit(module, datamodule=tiny_multidigits())


def test_feature_dim_is_required_for_opaque_encoders():
    with pytest.raises(ValueError, match="feature_dim"):
        MultiTaskModule(encoder=nn.Sequential(nn.Flatten()), tasks={"a": RegressionTask()})
    module = MultiTaskModule(encoder=nn.Flatten(), tasks={"a": RegressionTask()}, feature_dim=100)
    assert module(torch.randn(2, 1, 10, 10))["a"].shape == (2, 1)


def test_baselines_are_validated():
    with pytest.raises(ValueError, match="does not compute"):
        tiny_module(baselines={"left": {"mae": 1.0}})
    with pytest.raises(ValueError, match="unknown task 'up'"):
        tiny_module(baselines={"up": {"acc": 1.0}})


class _NanAfter(nn.Module):
    """A head that returns NaN from the given training step on."""

    def __init__(self, step):
        super().__init__()
        self.lin, self.step, self.calls = nn.Linear(32, 10), step, 0

    def forward(self, z):
        out = self.lin(z)
        if self.training:
            self.calls += 1
            if self.calls > self.step:
                out = out * math.nan
        return out


def test_nonfinite_loss_names_task_and_step():
    module = tiny_module(tasks={"left": ClassificationTask(10), "right": ClassificationTask(10, head=_NanAfter(2))})
    with pytest.raises(FloatingPointError, match=r"task right=nan at global step 2 .*on_nonfinite_loss=skip"):
        tiny_trainer(max_steps=5, limit_val_batches=0).fit(module, datamodule=tiny_multidigits())


def test_nonfinite_loss_can_skip_the_step():
    head = _NanAfter(2)
    module = tiny_module(
        tasks={"left": ClassificationTask(10), "right": ClassificationTask(10, head=head)}, on_nonfinite_loss="skip"
    )
    trainer = tiny_trainer(max_epochs=1, limit_train_batches=5, limit_val_batches=0)
    with pytest.warns(UserWarning, match="skipping this optimizer step"):
        trainer.fit(module, datamodule=tiny_multidigits())
    assert head.calls == 5
    # Adam counts the updates each parameter really received: three of the five steps were skipped
    state = trainer.optimizers[0].state[head.lin.weight]
    assert int(state["step"]) == 2
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_validation_logs_per_task_mean_and_delta_m():
    module = tiny_module(baselines={"left": {"acc": 0.5}, "right": {"acc": 0.5}})
    trainer = tiny_trainer(max_epochs=1, limit_train_batches=2)
    trainer.fit(module, datamodule=tiny_multidigits())
    m = trainer.callback_metrics
    for key in ("val/left/acc", "val/right/acc", "val/mean/acc", "val/left/loss", "val/loss", "val/delta_m"):
        assert key in m, key
    assert m["val/mean/acc"] == pytest.approx((m["val/left/acc"] + m["val/right/acc"]) / 2)
    expected = -100 * ((m["val/left/acc"] - 0.5) / 0.5 + (m["val/right/acc"] - 0.5) / 0.5) / 2
    assert m["val/delta_m"] == pytest.approx(float(expected), abs=1e-4)


def test_metrics_match_a_direct_computation():
    dm = tiny_multidigits()
    module = tiny_module()
    trainer = tiny_trainer()
    trainer.fit(module, datamodule=dm)
    trainer.test(module, datamodule=dm, verbose=False)
    module.eval()
    correct = {"left": 0, "right": 0}
    with torch.no_grad():
        for x, y in dm.test_dataloader():
            out = module(x)
            for t in correct:
                correct[t] += (out[t].argmax(1) == y[t]).sum().item()
    for t in correct:
        assert trainer.callback_metrics[f"test/{t}/acc"].item() == pytest.approx(correct[t] / 64)


def _loader(targets, n=16, batch_size=4):
    from torch.utils.data import DataLoader

    from lightning_mtl.datamodules._common import TensorMultiTaskDataset

    torch.manual_seed(0)
    return DataLoader(TensorMultiTaskDataset(torch.randn(n, 1, 10, 10), targets), batch_size=batch_size)


@pytest.mark.parametrize("stage", ["train", "val"])
def test_label_out_of_range_in_a_later_batch_names_task_and_step(stage):
    """Every batch is range-checked, not only the first: a bad label in batch 2 stops with the task, step,
    stage and the offending values (not cross_entropy's IndexError, a device-side assert on a GPU)."""
    torch.manual_seed(0)
    left, right = torch.randint(0, 10, (16,)), torch.randint(0, 10, (16,))
    right[9], right[10] = 12, 11  # both in batch 2 (batches of 4)
    loader = _loader({"left": left, "right": right})
    module = tiny_module()
    trainer = tiny_trainer(max_epochs=1)
    with pytest.raises(TaskError) as info:
        if stage == "train":
            trainer.fit(module, train_dataloaders=loader)
        else:
            trainer.validate(module, dataloaders=loader, verbose=False)
    message = str(info.value)
    assert "task 'right'" in message and "11..12" in message and "num_classes=10" in message, message
    assert f"{stage} batch 2" in message, message
    if stage == "train":
        assert "global step 2" in message, message


def test_label_out_of_range_outside_a_trainer_raises_at_once():
    module = tiny_module()
    x, y = _batch()
    module.training_step((x, y), 0)
    y["left"][3] = 10
    with pytest.raises(TaskError, match=r"task 'left': 1 label in 10\.\.10 is out of range for num_classes=10"):
        module.training_step((x, y), 1)


def test_nonfinite_inputs_are_named_as_the_cause():
    module = tiny_module()
    x, y = _batch()
    x[2, 0, 4, 4] = math.nan
    with pytest.raises(FloatingPointError, match=r"step 0 .*: the batch's inputs hold 1 non-finite value") as err:
        module.training_step((x, y), 0)
    assert "labels" not in str(err.value).split("global step 0")[1].split("on_nonfinite_loss")[0]


def test_nonfinite_labels_are_named_as_the_cause():
    module = tiny_module(tasks={"left": ClassificationTask(10), "depth": RegressionTask()})
    x, y = _batch()
    y = {"left": y["left"], "depth": torch.randn(6)}
    y["depth"][1] = math.inf
    y["depth"][4] = math.nan  # a missing label, not a cause
    with pytest.raises(FloatingPointError, match=r"depth=inf .*: the labels of task 'depth' hold 1 infinite value"):
        module.training_step((x, y), 0)


def test_nonfinite_loss_with_finite_inputs_and_labels_blames_the_model():
    module = tiny_module(tasks={"left": ClassificationTask(10), "right": ClassificationTask(10, head=_NanAfter(0))})
    with pytest.raises(FloatingPointError, match=r"inputs and labels are finite, so the model's outputs went"):
        module.training_step(_batch(), 0)


def test_progress_bar_shows_the_training_loss_and_each_tasks_validation_metrics():
    trainer = tiny_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(tiny_module(), datamodule=tiny_multidigits())
    shown = set(trainer.progress_bar_metrics)
    assert {"train/loss", "val/left/acc", "val/right/acc"} <= shown
    assert "val/mean/acc" in trainer.callback_metrics and "val/mean/acc" not in shown  # short: the tasks only
