"""The shape of the multi-task gradient path: one engine owns it, the families below import nothing above
them, the old import paths still give the same objects, and the conflict monitor reads the engine's
Jacobian of the step it logs instead of running a forward of its own."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_mtl import ClassificationTask, MultiTaskModule, RegressionTask
from lightning_mtl.multitask.engine import GradientEngine
from lightning_mtl.multitask.gradient_conflict import GradientConflictMonitor
from tests.helpers import tiny_module, tiny_multidigits, tiny_trainer

PACKAGE = Path(__file__).resolve().parents[2] / "lightning_mtl"

# the package's own __init__ imports every family; a bare package object stands in for it, so that only
# the imports of the sub-package under test run
_LOADED = """
import json, sys, types
package = types.ModuleType("lightning_mtl")
package.__path__ = [{path!r}]
sys.modules["lightning_mtl"] = package
import lightning_mtl.{name}
print(json.dumps(sorted(m for m in sys.modules if m.startswith("lightning_mtl."))))
"""


def _loaded_by(name: str) -> list[str]:
    code = _LOADED.format(path=str(PACKAGE), name=name)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("name", ["sharpness", "aggregators"])
def test_families_below_multitask_do_not_import_it(name):
    loaded = _loaded_by(name)
    assert f"lightning_mtl.{name}" in loaded
    assert not [m for m in loaded if m.startswith("lightning_mtl.multitask")], loaded


def test_old_paths_give_the_moved_objects():
    from lightning_mtl.aggregators import toy as old_toy
    from lightning_mtl.callbacks.gradient_conflict import GradientConflictMonitor as OldMonitor
    from lightning_mtl.multitask import fmtl, toy
    from lightning_mtl.sharpness import FMTL, perturb
    from lightning_mtl.sharpness._perturb import sam_perturbation
    from lightning_mtl.sharpness.fmtl import FMTL as OldFMTL

    assert FMTL is OldFMTL is fmtl.FMTL
    assert OldMonitor is GradientConflictMonitor
    assert old_toy.optimize is toy.optimize and old_toy.QUICK_PROTOCOL is toy.QUICK_PROTOCOL
    assert sam_perturbation is perturb.sam_perturbation
    with pytest.raises(AttributeError):
        old_toy.no_such_name  # noqa: B018


def test_capability_flags_are_declared_on_the_base_class():
    from lightning_mtl.aggregators import Aggregator, create_aggregator

    for flag in ("needs_losses_after_step", "needs_grad_norms", "uses_log_losses"):
        assert vars(Aggregator)[flag] is False, flag
    assert create_aggregator("gradnorm").needs_grad_norms and create_aggregator("famo").needs_losses_after_step
    assert create_aggregator("db_mtl").uses_log_losses and not create_aggregator("mgda").uses_log_losses


class _Counted(nn.Module):
    """Counts the encoder's forward calls."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder, self.out_features, self.calls = encoder, encoder.out_features, 0

    def forward(self, x):
        self.calls += 1
        return self.encoder(x)


@pytest.mark.parametrize("aggregator", ["ls", "mgda"])
@pytest.mark.parametrize("level", ["parameter", "representation"])
def test_conflict_monitor_runs_no_forward_of_its_own(aggregator, level):
    """One encoder forward per training step, measured or not, and the logged cosine is that of the
    step's own Jacobian (with a loss weighting the engine computes it for the measured steps only)."""
    seen = []

    class Spy(GradientConflictMonitor):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            jac = pl_module.engine.last_jacobian
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            seen.append((trainer.global_step, None if jac is None else jac.clone()))

    base = tiny_module(aggregator=aggregator)
    module = tiny_module(encoder=_Counted(base.encoder), aggregator=aggregator)
    monitor = Spy(every_n_steps=2, level=level, log_image=False)
    trainer = tiny_trainer(max_steps=4, limit_val_batches=0, callbacks=[monitor])
    trainer.fit(module, datamodule=tiny_multidigits())
    assert module.encoder.calls == 4  # the four training steps' forwards, nothing more
    # the Jacobian exists exactly on the measured steps (2 and 4), and its cosine is what was logged
    assert [(step, jac is not None) for step, jac in seen] == [(1, False), (2, True), (3, False), (4, True)]
    jac = seen[-1][1]
    expected = F.cosine_similarity(jac[0], jac[1], dim=0)
    assert float(monitor.last_cosines[0, 1]) == pytest.approx(float(expected), abs=1e-6)
    width = sum(p.numel() for p in module.encoder.parameters()) if level == "parameter" else 32 * 32
    assert jac.shape == (2, width)


def _module(aggregator: str, **kwargs) -> MultiTaskModule:
    torch.manual_seed(0)
    return MultiTaskModule(
        encoder=nn.Sequential(nn.Linear(6, 5), nn.Tanh()),
        feature_dim=5,
        tasks={"a": ClassificationTask(3), "b": RegressionTask()},
        aggregator=aggregator,
        **kwargs,
    )


def _batch():
    g = torch.Generator().manual_seed(2)
    return torch.randn(8, 6, generator=g), {
        "a": torch.randint(0, 3, (8,), generator=g),
        "b": torch.randn(8, generator=g),
    }


@pytest.mark.parametrize(
    ("aggregator", "mode", "level"),
    [("ls", "parameter", "parameter"), ("uw", "parameter", "representation"), ("db_mtl", "parameter", "parameter"),
     ("mgda", "parameter", "representation"), ("mgda", "representation", "parameter")],
)  # fmt: skip
def test_a_requested_jacobian_is_the_plain_task_gradients_and_leaves_the_step_alone(aggregator, mode, level):
    x, y = _batch()
    plain, asked = _module(aggregator, gradient_mode=mode), _module(aggregator, gradient_mode=mode)
    assert isinstance(asked.engine, GradientEngine)
    plain.backward(plain.training_step((x, y), 0) * 8.0)  # a loss scale, as under 16-mixed
    asked.engine.request_jacobian(level)
    asked.backward(asked.training_step((x, y), 0) * 8.0)
    for p, q in zip(plain.parameters(), asked.parameters()):
        assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad)
    assert asked.engine.jacobian_request is None  # one request, one step

    z = plain.encoder(x)
    losses = [F.cross_entropy(plain.heads["a"](z), y["a"]), F.mse_loss(plain.heads["b"](z).squeeze(1), y["b"])]
    wrt = list(plain.encoder.parameters()) if level == "parameter" else [z]
    rows = [torch.cat([g.flatten() for g in torch.autograd.grad(loss, wrt, retain_graph=True)]) for loss in losses]
    assert torch.allclose(asked.engine.last_jacobian, torch.stack(rows), atol=1e-6, rtol=1e-5)
