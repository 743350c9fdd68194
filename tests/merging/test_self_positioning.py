"""Self Positioning: the merged model at chosen coefficients, the coefficient gradient against <dL/dtheta, tau_t>
on a DigitsTasks batch, coefficients that move to the constructed optimum (and only where the probe says),
and one-sentence errors."""

from __future__ import annotations

import functools

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_mtl import MISSING_LABEL
from lightning_mtl.datamodules import DigitsTasks
from lightning_mtl.merging import SelfPositioning
from tests.fixtures.ddp import SpawnDDP
from tests.fixtures.merging_learned import expert_state, head, pretrained
from tests.fixtures.trainers import one_thread, tiny_trainer  # noqa: F401  (one torch thread for this module)

TASKS = ("rotate90", "parity")


class DigitsClassifier(nn.Module):
    """A shared encoder and one frozen head per task; ``batch_loss`` sums each task's cross-entropy over the
    samples that carry its label (the DigitsTasks layout)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = pretrained()
        self.heads = nn.ModuleDict({"rotate90": head(10, 3), "parity": head(2, 4)})

    def batch_loss(self, batch):
        x, labels = batch
        features = self.encoder(x)
        losses = []
        for task, y in labels.items():
            rows = y != MISSING_LABEL
            losses.append(F.cross_entropy(self.heads[task](features[rows]), y[rows]))
        return torch.stack(losses).sum()


def _experts(model):
    """Two experts as full state dicts of the classifier: the encoder moved, the heads as they are."""
    heads = {k: v for k, v in model.state_dict().items() if k.startswith("heads.")}
    return {
        task: {**{f"encoder.{k}": v for k, v in expert_state(model.encoder, seed).items()}, **heads}
        for seed, task in enumerate(TASKS, start=1)
    }


@pytest.fixture(scope="module")
def digits_batch():
    data = DigitsTasks(tasks=list(TASKS), batch_size=32, seed=0)
    data.setup("fit")
    return next(iter(data.train_dataloader()))


def _positioning(init=None, **kwargs):
    model = DigitsClassifier()
    experts = _experts(model)
    module = SelfPositioning(model, experts, init=init, include=["encoder."], **kwargs)
    return module, model, experts


def test_one_hot_coefficients_give_each_expert_and_zero_gives_theta_0(digits_batch):
    module, model, experts = _positioning(init=0.0)
    x = digits_batch[0]
    theta_0 = model.encoder(x)
    assert torch.equal(module.call("encoder", x), theta_0)
    for task in TASKS:
        module, _, _ = _positioning(init={t: float(t == task) for t in TASKS})
        reference = DigitsClassifier()
        reference.load_state_dict(experts[task])
        # theta_0 + (theta_t - theta_0) in float32: equal up to one rounding of the subtraction
        torch.testing.assert_close(module.call("encoder", x), reference.encoder.eval()(x), rtol=1e-5, atol=1e-6)
        merged = module.merged_state_dict()
        assert torch.equal(merged["heads.parity.weight"], model.heads["parity"].weight)  # not included: untouched


def test_the_coefficient_gradient_is_the_inner_product_of_the_loss_gradient_with_each_task_vector(digits_batch):
    alpha = {"rotate90": 0.7, "parity": -0.2}
    module, model, experts = _positioning(init=alpha)
    loss = module.call("batch_loss", digits_batch)
    loss.backward()
    # by hand: the plain model at the merged weights, autograd w.r.t. its parameters
    merged = DigitsClassifier()
    theta_0 = model.state_dict()
    tau = {t: {k: experts[t][k] - theta_0[k] for k in theta_0 if k.startswith("encoder.")} for t in TASKS}
    merged.load_state_dict({k: v + sum(alpha[t] * tau[t][k] for t in TASKS) if k in tau["parity"] else v
                            for k, v in theta_0.items()})  # fmt: skip
    merged.eval()
    merged.batch_loss(digits_batch).backward()
    grads = dict(merged.named_parameters())
    expected = [sum(float((grads[k].grad * tau[t][k]).sum()) for k in tau[t] if k in grads) for t in TASKS]
    torch.testing.assert_close(module.coefficients.grad, torch.tensor(expected), rtol=1e-4, atol=1e-6)
    assert all(abs(g) > 1e-3 for g in expected)  # a real test: both gradients are far from zero


class LinearRegression(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 1, bias=False)
        nn.init.zeros_(self.linear.weight)  # theta_0 = 0

    def batch_loss(self, batch):
        x, y = batch
        return F.mse_loss(self.linear(x).squeeze(-1), y)


def _regression_probe(tasks, n=64):
    """Task A's inputs live on coordinates 0-1 and its target is w_A . x; task B's on 2-3 with w_B. The experts
    are exactly w_A and w_B, so the probe loss is minimal at alpha = (1, 1) for a balanced probe."""
    g = torch.Generator().manual_seed(0)
    w = {"a": torch.tensor([1.5, -2.0, 0.0, 0.0]), "b": torch.tensor([0.0, 0.0, 0.5, 1.0])}
    xs, ys = [], []
    for task in tasks:
        x = torch.randn(n, 4, generator=g) * (w[task] != 0)
        xs.append(x)
        ys.append(x @ w[task])
    experts = {task: {"linear.weight": w[task][None]} for task in ("a", "b")}
    return DataLoader(TensorDataset(torch.cat(xs), torch.cat(ys)), batch_size=32, shuffle=True), experts


@pytest.mark.parametrize("probe", [("a", "b"), ("a",)], ids=["balanced", "task_a_only"])
def test_learned_coefficients_move_to_the_optimum_of_the_probe(probe):
    loader, experts = _regression_probe(probe)
    torch.manual_seed(0)
    module = SelfPositioning(LinearRegression(), experts, optimizer=functools.partial(torch.optim.SGD, lr=0.05))
    assert module.coefficient_dict() == {"a": 0.5, "b": 0.5}  # starts at weight averaging
    tiny_trainer(max_epochs=30).fit(module, loader)
    learned = module.coefficient_dict()
    # a noise-free convex quadratic in alpha (every batch has its minimum at 1 for each task it holds): SGD at
    # lr 0.05 contracts the error by at least 0.7 a step, so 60+ steps end far inside 1e-2
    assert learned["a"] == pytest.approx(1.0, abs=1e-2)
    if "b" in probe:
        assert learned["b"] == pytest.approx(1.0, abs=1e-2)
    else:  # task A's data never sees task B's coordinates: its coefficient gets exactly zero gradient
        assert learned["b"] == 0.5


def test_bad_input_is_one_sentence():
    model = DigitsClassifier()
    experts = _experts(model)
    with pytest.raises(ValueError, match="objective 'loss' is not a method of DigitsClassifier"):
        SelfPositioning(model, experts, objective="loss")
    with pytest.raises(ValueError, match="experts is empty"):
        SelfPositioning(model, {})
    broken = {**experts, "parity": {k: v for k, v in experts["parity"].items() if k != "encoder.0.bias"}}
    with pytest.raises(KeyError, match="expert 'parity' has no entry 'encoder.0.bias'"):
        SelfPositioning(model, broken)
    wrong = {**experts, "parity": {**experts["parity"], "encoder.0.bias": torch.zeros(5)}}
    with pytest.raises(ValueError, match=r"entry 'encoder.0.bias' has shape \(5,\), the model's is \(4,\)"):
        SelfPositioning(model, wrong)
    with pytest.raises(KeyError, match="init names 'parity'"):
        SelfPositioning(model, experts, init={"rotate90": 1.0})
    with pytest.raises(ValueError, match="include .* selects no floating entry"):
        SelfPositioning(model, experts, include=["decoder."])


def test_true_half_precision_is_refused_at_fit_start():
    loader, experts = _regression_probe(("a",))
    module = SelfPositioning(LinearRegression(), experts)
    with pytest.raises(ValueError, match="use precision='16-mixed' or 'bf16-mixed' instead of precision='bf16-true'"):
        tiny_trainer(precision="bf16-true").fit(module, loader)


class _SaveBatch(pl.Callback):
    def __init__(self, folder):
        self.folder = folder

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        torch.save(batch, self.folder / f"batch_rank{trainer.global_rank}.pt")

    def on_train_end(self, trainer, pl_module):
        torch.save(pl_module.coefficients.detach(), self.folder / f"coef_rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_ddp_step_equals_the_single_process_step_on_the_concatenated_batch(tmp_path):
    loader, experts = _regression_probe(("a", "b"), n=8)
    loader = DataLoader(loader.dataset, batch_size=8, shuffle=False)  # 16 pairs: 8 on each rank
    sgd = functools.partial(torch.optim.SGD, lr=0.05)
    module = SelfPositioning(LinearRegression(), experts, init={"a": 0.2, "b": 0.9}, optimizer=sgd)
    start = SelfPositioning(LinearRegression(), experts, init={"a": 0.2, "b": 0.9})
    trainer = tiny_trainer(strategy=SpawnDDP(), devices=2, limit_train_batches=1, callbacks=[_SaveBatch(tmp_path)])
    trainer.fit(module, loader)
    ranks = [torch.load(tmp_path / f"coef_rank{r}.pt") for r in (0, 1)]
    assert torch.equal(ranks[0], ranks[1]), "coefficients differ between ranks"
    parts = [torch.load(tmp_path / f"batch_rank{r}.pt") for r in (0, 1)]
    batch = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    assert len(batch[0]) == 16 and not torch.equal(parts[0][0], parts[1][0])
    optimizer = torch.optim.SGD([start.coefficients], lr=0.05)
    start.call("batch_loss", batch).backward()
    optimizer.step()
    torch.testing.assert_close(ranks[0], start.coefficients.detach(), rtol=1e-6, atol=1e-7)
    assert not torch.allclose(ranks[0], torch.tensor([0.2, 0.9]))  # the step moved them


def test_a_resumed_fit_ends_where_the_uninterrupted_one_does(tmp_path):
    loader, experts = _regression_probe(("a", "b"), n=16)
    loader = DataLoader(loader.dataset, batch_size=8, shuffle=False)
    adam = functools.partial(torch.optim.Adam, lr=0.05)  # optimizer state that must survive the restart too

    def fresh():
        return SelfPositioning(LinearRegression(), experts, optimizer=adam)

    whole = fresh()
    tiny_trainer(max_epochs=2).fit(whole, loader)
    first = tiny_trainer(max_epochs=1, enable_checkpointing=True, default_root_dir=tmp_path)
    first.fit(fresh(), loader)
    (checkpoint,) = tmp_path.rglob("*.ckpt")
    resumed = fresh()
    tiny_trainer(max_epochs=2).fit(resumed, loader, ckpt_path=str(checkpoint))
    assert torch.equal(resumed.coefficients, whole.coefficients)
    assert not torch.equal(whole.coefficients, torch.full((2,), 0.5))
