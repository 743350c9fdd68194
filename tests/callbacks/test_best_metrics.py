"""BestMetricsSummary in a plain Lightning project (``val_acc`` / ``val_loss``, no ``metric_directions``)
and with the library's own modules: explicit monitor / mode, directions from torchmetrics, a warning
for an unknown direction, and where the best values go (W&B summary, CSV logger, no logger)."""

from __future__ import annotations

import csv
import functools
import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import MeanSquaredError, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from lightning_mtl.callbacks import BestMetricsSummary
from tests.fixtures.trainers import one_thread, tiny_module, tiny_multidigits, tiny_trainer  # noqa: F401

ACC = (0.52, 0.80, 0.83)  # validation accuracy by epoch: rises
LOSS = (0.90, 0.55, 0.47)  # validation loss by epoch: falls


def _scripted_predictions(acc: float, n: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictions of which the first ``round(acc * n)`` are right: their accuracy is ``acc``."""
    target = torch.arange(n) % 3
    preds = target.clone()
    right = round(acc * n)
    preds[right:] = (target[right:] + 1) % 3
    return preds, target


class PlainProject(BoringModel):
    """A user's module: ``val_acc`` and ``val_loss`` logged as tensors (``logged="tensor"``), as
    torchmetrics objects (``"metric"``), or computed from a MetricCollection (``"collection"``)."""

    def __init__(self, logged: str = "tensor") -> None:
        super().__init__()
        self.logged = logged
        self.acc = MulticlassAccuracy(num_classes=3, average="micro")
        self.mse = MeanSquaredError()
        if logged == "collection":  # its prefixed names are the logged keys
            accuracy = MulticlassAccuracy(num_classes=3, average="micro")
            self.val_metrics = MetricCollection({"acc": accuracy}, prefix="val_")

    def validation_step(self, batch, batch_idx):
        epoch = self.current_epoch
        preds, target = _scripted_predictions(ACC[epoch])
        if self.logged == "metric":
            self.acc.update(preds, target)
            self.mse.update(torch.full((4,), math.sqrt(LOSS[epoch])), torch.zeros(4))  # mean square = LOSS
            self.log("val_acc", self.acc)
            self.log("val_loss", self.mse)
            return
        self.log("val_loss", torch.tensor(LOSS[epoch]))
        if self.logged == "collection":
            self.val_metrics.update(preds, target)
        else:
            self.log("val_acc", torch.tensor(ACC[epoch]))

    def on_validation_epoch_end(self):
        if self.logged == "collection":
            self.log_dict(self.val_metrics.compute())
            self.val_metrics.reset()


class Recorder(pl.Callback):
    """Every value each key had at the end of a validation: the reference for best-so-far."""

    def __init__(self) -> None:
        self.seen: dict[str, list[float]] = {}

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            for key, value in trainer.callback_metrics.items():
                self.seen.setdefault(key, []).append(float(value))


def _fit(best: BestMetricsSummary, logged: str = "tensor", **trainer_kwargs) -> dict[str, list[float]]:
    pl.seed_everything(0)
    recorder = Recorder()
    defaults = dict(max_epochs=len(ACC), limit_train_batches=2, limit_val_batches=2, logger=False)
    defaults.update(trainer_kwargs)
    trainer = tiny_trainer(callbacks=[recorder, best], **defaults)
    trainer.fit(PlainProject(logged))
    seen = recorder.seen
    # the scripted curves really move, so best and worst differ
    assert len(seen["val_acc"]) == len(ACC) and max(seen["val_acc"]) > min(seen["val_acc"])
    assert min(seen["val_loss"]) < max(seen["val_loss"])
    return seen


def _own_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "BestMetricsSummary" in str(w.message)]


@pytest.mark.parametrize(
    "monitor, mode",
    [("val_acc", "max"), (["val_acc", "val_loss"], {"val_acc": "max", "val_loss": "min"})],
    ids=["one-key", "per-key-mode"],
)
def test_monitor_and_mode_keep_the_best_value_of_each_key(monitor, mode, recwarn):
    best = BestMetricsSummary(monitor=monitor, mode=mode)
    seen = _fit(best)
    keys = [monitor] if isinstance(monitor, str) else monitor
    assert set(best.best) == set(keys)  # only the monitored keys
    for key in keys:
        direction = mode if isinstance(mode, str) else mode[key]
        assert best.best[key] == (max if direction == "max" else min)(seen[key])
    assert not _own_warnings(recwarn)


def test_direction_comes_from_the_logged_torchmetrics_objects(recwarn):
    """``MulticlassAccuracy.higher_is_better`` is True and ``MeanSquaredError``'s False."""
    best = BestMetricsSummary(prefix="val")
    seen = _fit(best, logged="metric")
    assert best.best["val_acc"] == max(seen["val_acc"])
    assert best.best["val_loss"] == min(seen["val_loss"])
    assert not _own_warnings(recwarn)


def test_direction_comes_from_a_metric_collection_logged_as_computed_tensors(recwarn):
    best = BestMetricsSummary(prefix="val", mode={"val_loss": "min"})
    seen = _fit(best, logged="collection")
    assert best.best["val_acc"] == max(seen["val_acc"])
    assert best.best["val_loss"] == min(seen["val_loss"])
    assert not _own_warnings(recwarn)


def test_unknown_direction_warns_once_per_key_and_says_what_it_assumes(recwarn):
    best = BestMetricsSummary(prefix="val")
    seen = _fit(best)
    messages = _own_warnings(recwarn)
    for key in ("val_acc", "val_loss"):
        about = [m for m in messages if repr(key) in m]
        assert len(about) == 1, about  # once, although the key was seen every epoch
        assert "lower is better" in about[0] and "mode=" in about[0]
        assert best.best[key] == min(seen[key])  # what the warning says it assumes


def test_a_monitored_key_that_is_never_logged_warns_once(recwarn):
    best = BestMetricsSummary(monitor=["val_acc", "val_f1"], mode="max")
    _fit(best)
    about = [m for m in _own_warnings(recwarn) if "'val_f1'" in m]
    assert len(about) == 1 and "val_acc" in about[0]  # names the keys that were logged
    assert set(best.best) == {"val_acc"}


@pytest.mark.parametrize("mode", ["maximum", {"val_acc": "up"}])
def test_a_bad_mode_fails_at_construction_naming_the_argument(mode):
    with pytest.raises(ValueError, match="mode.*'min' or 'max'"):
        BestMetricsSummary(monitor="val_acc", mode=mode)


def test_csv_logger_gets_the_best_values_as_best_columns(tmp_path):
    best = BestMetricsSummary(prefix="val")
    logger = CSVLogger(tmp_path, name="run")
    seen = _fit(best, logged="metric", logger=logger)
    with open(f"{logger.log_dir}/metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for key, pick in (("val_acc", max), ("val_loss", min)):
        column = [float(row[f"best/{key}"]) for row in rows if row.get(f"best/{key}")]
        assert column, f"no best/{key} column in metrics.csv"
        assert column[-1] == pytest.approx(pick(seen[key]), rel=1e-6)
        assert column[-1] == pytest.approx(best.best[key], rel=1e-6)


def test_without_a_logger_the_best_values_stay_in_the_callback_state():
    best = BestMetricsSummary(monitor="val_acc", mode="max")
    seen = _fit(best, logger=False)
    assert best.state_dict()["best"] == {"val_acc": max(seen["val_acc"])}
    resumed = BestMetricsSummary(monitor="val_acc", mode="max")
    resumed.load_state_dict(best.state_dict())
    assert resumed.best == best.best


# -- the library's own modules -----------------------------------------------------------------------


def _er():
    from lightning_mtl.continual.er import ER

    torch.manual_seed(0)
    vit = dict(img_size=16, patch_size=4, embed_dim=48, depth=1, num_heads=3)
    module = ER(num_classes=6, backbone="vit_tiny_patch16_224", vit_kwargs=vit)
    module.seen_classes.fill_(6)  # every class exposed: evaluation scores all of them
    return module, torch.randn(16, 3, 16, 16)


def _adautomix():
    from lightning_mtl.architectures.resnet_cifar import CifarResNet
    from lightning_mtl.mixup.adautomix import AdAutoMix

    torch.manual_seed(0)
    encoder = CifarResNet((1, 1, 1, 1), in_channels=1, width=4)
    module = AdAutoMix(encoder, num_classes=10, feature_channels=16, task_name="digit",
                       optimizer=functools.partial(torch.optim.SGD, lr=0.05))  # fmt: skip
    return module, torch.randn(16, 1, 16, 16)


@pytest.mark.parametrize("build", [_er, _adautomix], ids=["continual-ER", "AdAutoMix"])
def test_library_modules_name_the_direction_of_every_validation_key(build, recwarn):
    """Two validations, the first on labels the model gets right, the second on labels it gets wrong:
    the best accuracy is the first one's, the best loss too."""
    module, inputs = build()
    module.eval()
    with torch.no_grad():
        right = module(inputs).argmax(1)
    wrong = (right + 1) % module.num_classes
    recorder, best = Recorder(), BestMetricsSummary()
    trainer = tiny_trainer(callbacks=[recorder, best])
    for labels in (right, wrong):
        trainer.validate(module, dataloaders=DataLoader(TensorDataset(inputs, labels), batch_size=8), verbose=False)
    assert not _own_warnings(recwarn)
    accuracy_keys = [k for k in best.best if k.endswith("/acc")]
    assert accuracy_keys and "val/loss" in best.best
    for key in accuracy_keys:
        assert best.best[key] == max(recorder.seen[key]) > min(recorder.seen[key])
    assert best.best["val/loss"] == min(recorder.seen["val/loss"])


def test_multitask_module_keys_need_no_warning(recwarn):
    best = BestMetricsSummary()
    trainer = tiny_trainer(callbacks=[best], limit_train_batches=2, limit_val_batches=2)
    trainer.fit(tiny_module(), datamodule=tiny_multidigits())
    assert {"val/loss", "val/left/loss", "val/left/acc", "val/mean/acc"} <= set(best.best)
    assert not _own_warnings(recwarn)
