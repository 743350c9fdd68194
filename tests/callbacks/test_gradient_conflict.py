import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_mtl.callbacks import GradientConflictMonitor
from lightning_mtl.callbacks.gradient_conflict import heatmap
from tests.helpers import tiny_module, tiny_multidigits, tiny_trainer


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
    grads = [torch.cat([g.flatten() for g in torch.autograd.grad(l, wrt, retain_graph=True)]) for l in losses]
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
