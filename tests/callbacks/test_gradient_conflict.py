import csv
import io
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

from lightning_mtl.callbacks import GradientConflictMonitor
from lightning_mtl.callbacks.gradient_conflict import heatmap
from tests.fixtures.trainers import tiny_module, tiny_multidigits, tiny_trainer


@pytest.mark.parametrize("level", ["parameter", "representation"])
def test_cosines_equal_a_direct_computation_and_buffers_are_untouched(level):
    module = tiny_module()
    dm = tiny_multidigits()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    jac = GradientConflictMonitor(level=level).jacobian(module, batch)
    for k, v in module.state_dict().items():
        assert torch.equal(v, before[k]), k  # BatchNorm running statistics restored

    x, y = batch
    z = module.encoder(x)
    losses = [F.cross_entropy(module.heads[t](z), y[t]) for t in ("left", "right")]
    wrt = list(module.encoder.parameters()) if level == "parameter" else [z]
    grads = [torch.cat([g.flatten() for g in torch.autograd.grad(loss, wrt, retain_graph=True)]) for loss in losses]
    assert torch.allclose(jac, torch.stack(grads), atol=1e-5)


def test_logs_scalars_and_a_heatmap_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monitor = GradientConflictMonitor(every_n_steps=2)
    logger = TensorBoardLogger(tmp_path, name="", version="")
    trainer = tiny_trainer(max_steps=4, limit_val_batches=0, logger=logger, callbacks=[monitor], log_every_n_steps=1)
    trainer.fit(tiny_module(), datamodule=tiny_multidigits())
    m = trainer.callback_metrics
    assert {"train/grad_cos/left__right", "train/grad_norm/left", "train/grad_norm/right"} <= set(m)
    cos = monitor.last_cosines
    assert torch.allclose(torch.diag(cos), torch.ones(2), atol=1e-5) and torch.allclose(cos, cos.T)
    assert float(m["train/grad_cos/left__right"]) == pytest.approx(float(cos[0, 1]), abs=1e-5)
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0}).Reload()
    assert "train/grad_cos" in events.Tags()["images"]


def test_heatmap_colours():
    image = heatmap(torch.tensor([[1.0, -1.0], [0.0, 0.5]]), cell=1)
    assert torch.allclose(image[:, 0, 0], torch.tensor([1.0, 0.0, 0.0]))  # aligned: red
    assert torch.allclose(image[:, 0, 1], torch.tensor([0.0, 0.0, 1.0]))  # conflicting: blue
    assert torch.allclose(image[:, 1, 0], torch.ones(3))  # orthogonal: white


class _WandbRecorder(WandbLogger):
    """A WandbLogger whose run is a list: its own log_image builds the wandb.Image objects, which are kept
    instead of being sent; no W&B run starts."""

    def __init__(self):
        super().__init__(offline=True)
        self.records = []

    @property
    def experiment(self):
        return SimpleNamespace(log=self.records.append)

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def _pixels(wandb_image):
    # what W&B stores: the PIL image it made from the array it was given
    return np.asarray(wandb_image.image.convert("RGB"))


class _DirectCosine(pl.Callback):
    """At the monitor's steps, the cosine and norms of the two task gradients w.r.t. the encoder by autograd,
    on the logged step's batch at the parameters that step started from."""

    def __init__(self, every):
        self.every, self.expected, self.pending = every, {}, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        # measured before the update: the batch whose optimizer step makes global_step + 1
        self.pending = self.measure(pl_module, batch) if (trainer.global_step + 1) % self.every == 0 else None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step == 0 or step % self.every or step in self.expected:
            return  # the first batch to end at a measured step after an optimizer step (accumulation: several do)
        self.expected[step] = self.pending

    @staticmethod
    def measure(pl_module, batch):
        buffers = {k: v.clone() for k, v in pl_module.named_buffers()}
        x, y = batch
        with torch.enable_grad():
            z = pl_module.encoder(x)
            params = list(pl_module.encoder.parameters())
            losses = [F.cross_entropy(pl_module.heads[t](z), y[t]) for t in ("left", "right")]
            grads = [torch.autograd.grad(loss, params, retain_graph=True) for loss in losses]
        grads = [torch.cat([g.flatten() for g in grad]) for grad in grads]
        with torch.no_grad():
            for k, v in pl_module.named_buffers():
                v.copy_(buffers[k])
        grads = [g.double() for g in grads]
        cos = float(grads[0] @ grads[1] / (grads[0].norm() * grads[1].norm()))
        return cos, float(grads[0].norm()), float(grads[1].norm())


@pytest.mark.parametrize("accumulate", [1, 2])
def test_each_measurement_is_logged_once_at_its_own_step(tmp_path, accumulate):
    # log_every_n_steps (4) and every_n_steps (3) out of phase: Lightning's step logging would shift and repeat them
    direct = _DirectCosine(every=3)
    monitor = GradientConflictMonitor(every_n_steps=3, log_image=False)
    logger = CSVLogger(tmp_path, name="", version="")
    max_steps = 12 // accumulate
    trainer = tiny_trainer(max_epochs=-1, max_steps=max_steps, limit_val_batches=0, logger=logger,
                           callbacks=[direct, monitor], log_every_n_steps=4, accumulate_grad_batches=accumulate)  # fmt: skip
    trainer.fit(tiny_module(), datamodule=tiny_multidigits())
    with open(Path(logger.log_dir) / "metrics.csv") as file:
        rows = [r for r in csv.DictReader(file) if r.get("train/grad_cos/left__right")]
    assert [int(r["step"]) for r in rows] == list(range(3, max_steps + 1, 3)) == sorted(direct.expected)
    for row in rows:
        cos, left, right = direct.expected[int(row["step"])]
        assert float(row["train/grad_cos/left__right"]) == pytest.approx(cos, abs=1e-4)
        assert float(row["train/grad_norm/left"]) == pytest.approx(left, rel=1e-4)
        assert float(row["train/grad_norm/right"]) == pytest.approx(right, rel=1e-4)


def test_wandb_and_tensorboard_get_full_range_heatmaps(tmp_path):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    wandb = _WandbRecorder()
    tensorboard = TensorBoardLogger(tmp_path, name="", version="")
    monitor = GradientConflictMonitor(every_n_steps=2)
    trainer = tiny_trainer(max_steps=4, limit_val_batches=0, logger=[wandb, tensorboard], callbacks=[monitor])
    trainer.fit(tiny_module(), datamodule=tiny_multidigits())
    images = [(r["trainer/global_step"], r["train/grad_cos"][0]) for r in wandb.records if "train/grad_cos" in r]
    assert [step for step, _ in images] == [2, 4]
    for _, image in images:
        pixels = _pixels(image)
        # a uint8 picture: shades between black and white, not the 0/1 left by casting [0, 1] floats
        assert pixels.max() > 200 and len(np.unique(pixels)) > 16
    tensorboard.experiment.flush()
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0}).Reload()
    shown = events.Images("train/grad_cos")
    assert [e.step for e in shown] == [2, 4]
    pixels = np.asarray(Image.open(io.BytesIO(shown[0].encoded_image_string)).convert("RGB"))
    assert pixels.max() > 200 and len(np.unique(pixels)) > 16


def test_distinct_matrices_give_distinct_pictures():
    from lightning_mtl.callbacks.gradient_conflict import conflict_image

    pytest.importorskip("matplotlib")
    import wandb

    names = ["left", "right"]
    a = conflict_image(torch.tensor([[1.0, 0.3], [0.3, 1.0]]), names, step=5)
    b = conflict_image(torch.tensor([[1.0, 0.6], [0.6, 1.0]]), names, step=5)
    assert a.dtype == np.uint8 and a.shape == b.shape and a.ndim == 3 and a.shape[2] == 3
    assert not np.array_equal(_pixels(wandb.Image(a)), _pixels(wandb.Image(b)))


def test_heatmap_figure_names_the_tasks_and_shows_the_values():
    from lightning_mtl.callbacks.gradient_conflict import conflict_figure

    pytest.importorskip("matplotlib")
    names = ["depth", "segmentation", "normal"]
    cos = torch.tensor([[1.0, -0.25, 0.5], [-0.25, 1.0, 0.75], [0.5, 0.75, 1.0]])
    figure = conflict_figure(cos, names, step=40)
    axes, bar = figure.axes
    assert [t.get_text() for t in axes.get_xticklabels()] == names
    assert [t.get_text() for t in axes.get_yticklabels()] == names
    assert sorted(t.get_text() for t in axes.texts) == sorted(f"{v:.2f}" for v in cos.flatten().tolist())
    assert axes.images[0].get_clim() == (-1.0, 1.0) and tuple(bar.get_ylim()) == (-1.0, 1.0)
    assert "40" in axes.get_title()


def test_without_matplotlib_the_plain_heatmap_is_logged_with_one_warning(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    wandb = _WandbRecorder()
    monitor = GradientConflictMonitor(every_n_steps=1)
    trainer = tiny_trainer(max_steps=3, limit_val_batches=0, logger=wandb, callbacks=[monitor])
    with pytest.warns(UserWarning, match="matplotlib") as caught:
        trainer.fit(tiny_module(), datamodule=tiny_multidigits())
    assert len([w for w in caught if "matplotlib" in str(w.message)]) == 1
    images = [r["train/grad_cos"][0] for r in wandb.records if "train/grad_cos" in r]
    assert len(images) == 3
    expected = (heatmap(monitor.last_cosines) * 255).round().byte().permute(1, 2, 0).numpy()
    assert np.array_equal(_pixels(images[-1]), expected)
