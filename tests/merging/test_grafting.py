"""Grafting: the mask's end points (theta_0, the expert), the base patch, the logits' gradient against the
official hand-written step, the best-mask bookkeeping, the saved mask, IoU, and resume."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from lightning_mtl.datamodules import DigitsTasks
from lightning_mtl.merging import Grafting, apply_graft, load_mask, mask_iou, save_mask
from lightning_mtl.merging.grafting import _top_fraction
from tests.fixtures.ddp import SpawnDDP
from tests.fixtures.merging_learned import SaveRankStep, expert_state, head, pretrained, task_vector
from tests.fixtures.trainers import one_thread, tiny_trainer  # noqa: F401  (one torch thread for this module)


def _graft(**kwargs):
    base = pretrained()
    expert = expert_state(base, 1)
    kwargs.setdefault("optimizer", functools.partial(torch.optim.SGD, lr=1e6))
    module = Grafting(base, expert=expert, task="rotate90", head=head(10, 3), **kwargs)
    return module, base, expert


def _ones(module, value):
    return {
        n: torch.full_like(getattr(module, f"_tau{e}"), value, dtype=torch.bool)
        for e, n in enumerate(module.entry_names)
    }


def test_all_ones_mask_is_the_expert_and_all_zeros_is_theta0():
    module, base, expert = _graft()
    x = torch.randn(6, 1, 8, 8)
    assert torch.equal(module(x, _ones(module, False)), module.head(base(x)))
    expert_model = copy.deepcopy(base)
    expert_model.load_state_dict(expert)
    assert torch.allclose(module(x, _ones(module, True)), module.head(expert_model(x)), atol=1e-5)
    # apply_graft gives the same two end points as state dicts, loaded into a model
    model = copy.deepcopy(base)
    zeros = apply_graft(model, base.state_dict(), task_vector(base, expert), _ones(module, False))
    assert all(torch.equal(zeros[k], v) for k, v in base.state_dict().items())
    ones = apply_graft(model, base.state_dict(), task_vector(base, expert), _ones(module, True))
    assert all(torch.allclose(ones[k].float(), v.float(), atol=1e-6) for k, v in expert.items())
    assert torch.allclose(model(x), expert_model(x), atol=1e-5)


def test_base_patch_is_the_top_fraction_of_all_magnitudes_with_ties_kept():
    a, b = torch.tensor([0.1, 5.0, 2.0]), torch.tensor([[3.0, 2.0], [0.0, 4.0]])
    patch = _top_fraction([a, b], 3 / 7)  # k = 3: 5, 4, 3
    assert patch[0].tolist() == [False, True, False] and patch[1].tolist() == [[True, False], [False, True]]
    tied = _top_fraction([a, b], 4 / 7)  # k = 4: threshold 2.0, held by two entries: both kept
    assert int(tied[0].sum() + tied[1].sum()) == 5
    assert int(sum(p.sum() for p in _top_fraction([a, b], 0.0))) == 0

    module, base, expert = _graft(sparsity=0.05)
    taus = task_vector(base, expert)
    total = sum(taus[n].numel() for n in module.parameter_names)
    chosen = sum(int(getattr(module, f"_base{i}").sum()) for i in range(len(module.parameter_names)))
    assert chosen == round(0.05 * total)
    # training starts at the base patch: sigmoid(S - 10) < sigmoid(-9) = 1.3e-4 for S in [0, 1)
    for i, gamma in enumerate(module.relaxed_mask()):
        assert torch.allclose(gamma, getattr(module, f"_base{i}").float(), atol=1.3e-4)
    rounded = module.rounded_mask()
    assert rounded.keys() == taus.keys()
    for i, name in enumerate(module.parameter_names):
        assert torch.equal(rounded[name], getattr(module, f"_base{i}"))
    # the BatchNorm running statistics follow the mask of the BatchNorm weight
    assert torch.equal(rounded["1.running_mean"], rounded["1.weight"])


def test_logit_gradient_is_the_official_hand_written_step():
    """dL/dS = (dL/dtheta * tau) * (1 - 2 base) * sigmoid'(S - b): the official update divided by its lr."""
    module, base, expert = _graft(sparsity=0.1)
    with torch.no_grad():
        for p in module.logits:
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 4 + 6)  # away from saturation
    x, y = torch.randn(10, 1, 8, 8), torch.randint(0, 10, (10,))
    module.training_step((x, {"rotate90": y}), 0).backward()

    theta = {k: v.detach().requires_grad_(k in module.parameter_names) for k, v in module.grafted_state().items()}
    loss = F.cross_entropy(module.head(functional_call(base, theta, (x,))), y)
    names = module.parameter_names
    grads = dict(zip(names, torch.autograd.grad(loss, [theta[n] for n in names], allow_unused=True)))
    taus = task_vector(base, expert)
    for i, name in enumerate(names):
        s = module.logits[i].detach()
        sig = torch.sigmoid(s - module.sigmoid_bias)
        start = getattr(module, f"_base{i}").float()
        g = grads[name] if grads[name] is not None else torch.zeros_like(s)
        expected = g * taus[name] * (1 - 2 * start) * sig * (1 - sig)
        assert torch.allclose(module.logits[i].grad, expected, rtol=1e-4, atol=1e-9), name


def test_mask_file_round_trip_and_iou(tmp_path):
    module, _, _ = _graft(sparsity=0.2)
    mask = module.rounded_mask()
    save_mask(mask, tmp_path / "mask.pt")
    loaded = load_mask(tmp_path / "mask.pt")
    assert loaded.keys() == mask.keys() and all(torch.equal(loaded[k], mask[k]) for k in mask)
    big = {"w": torch.rand(100_000) > 0.5}
    save_mask(big, tmp_path / "big.pt")
    assert (tmp_path / "big.pt").stat().st_size < 100_000 / 8 + 4096  # bits, not bytes (plus a header)
    assert torch.equal(load_mask(tmp_path / "big.pt")["w"], big["w"])

    a = {"w": torch.tensor([True, True, False, False]), "v": torch.tensor([True])}
    b = {"w": torch.tensor([True, False, True, False]), "u": torch.tensor([True, True])}
    # intersection 1 (w[0]); union: w has 3, v 1, u 2
    assert mask_iou(a, b) == pytest.approx(1 / 6)
    assert mask_iou(a, a) == 1.0


def test_bad_input_gets_one_sentence():
    base = pretrained()
    with pytest.raises(KeyError, match="the expert has no entry '0.weight'"):
        Grafting(base, expert={"0.bias": torch.zeros(4)}, task="t", head=head(10, 0))
    with pytest.raises(ValueError, match="pass `head`"):
        Grafting(base, expert=expert_state(base, 1), task="t")
    with pytest.raises(ValueError, match="sparsity must be a fraction"):
        Grafting(base, expert=expert_state(base, 1), task="t", head=head(10, 0), sparsity=2.0)


# -- through the Trainer ---------------------------------------------------------------------------------------
def _fit(module, ckpt_path=None, **kwargs):
    kwargs.setdefault("max_epochs", 1)
    trainer = tiny_trainer(
        limit_train_batches=3, limit_val_batches=2, num_sanity_val_steps=0, deterministic=True, **kwargs
    )
    trainer.fit(module, datamodule=DigitsTasks("rotate90", batch_size=32), ckpt_path=ckpt_path)
    return trainer


def test_training_changes_only_the_logits_and_keeps_the_best_rounded_mask(tmp_path):
    module, _, _ = _graft(sparsity=0.05, mask_path=str(tmp_path / "best.pt"))
    before = copy.deepcopy(module.state_dict())
    trainer = _fit(module, max_epochs=3)
    after = module.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("logits.", "best_mask", "best_score")) for k in changed), changed
    assert any(k.startswith("logits.") for k in changed)
    # the kept mask is the rounded mask of the best validation, written to mask_path
    assert float(module.best_score) == pytest.approx(float(trainer.callback_metrics["val/rotate90/best_acc"]))
    saved = load_mask(tmp_path / "best.pt")
    assert all(torch.equal(saved[k], v) for k, v in module.best_mask.items())
    single = tiny_trainer(limit_val_batches=2)
    module.best_score.fill_(-1.0)
    rounded_acc = single.validate(module, datamodule=DigitsTasks("rotate90", batch_size=32), verbose=False)[0]
    assert rounded_acc["val/rotate90/acc"] <= float(trainer.callback_metrics["val/rotate90/best_acc"]) + 1e-6


def test_resume_from_a_mid_training_checkpoint_is_bit_exact(tmp_path):
    straight, _, _ = _graft(sparsity=0.05)
    _fit(straight, max_epochs=2)
    first, _, _ = _graft(sparsity=0.05)
    trainer = _fit(first)
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    resumed, _, _ = _graft(sparsity=0.05)
    _fit(resumed, ckpt_path=tmp_path / "mid.ckpt", max_epochs=2)
    for a, b in zip(resumed.logits, straight.logits):
        assert torch.equal(a, b)
    assert all(torch.equal(resumed.best_mask[k], v) for k, v in straight.best_mask.items())
    assert torch.equal(resumed.best_score, straight.best_score)


def test_bf16_mixed_trains():
    module, _, _ = _graft(sparsity=0.05)
    _fit(module, precision="bf16-mixed")
    assert all(p.dtype == torch.float32 and bool(p.isfinite().all()) for p in module.logits)


def test_16_mixed_step_equals_the_float32_step():
    """16-mixed (float16 autocast, a GradScaler: built by hand, the flag alone turns into bf16-mixed on the CPU):
    the mask is built in float32 and the scaled gradient is unscaled before the step, so one step moves the
    logits as in float32, to float16 rounding (the gradients through the relaxed mask are ~1e-5 of the weight
    gradients: unscaled float16 would flush many of them to zero)."""
    from lightning.pytorch.plugins import MixedPrecision

    steps = []
    for plugins in (None, [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))]):
        module, _, _ = _graft(sparsity=0.05)
        start = [p.detach().clone() for p in module.logits]
        trainer = _fit(module, max_steps=1, plugins=plugins)
        steps.append(torch.cat([(p.detach() - s).flatten() for p, s in zip(module.logits, start)]))
    assert str(trainer.precision) == "16-mixed" and all(p.dtype == torch.float32 for p in module.logits)
    step32, step16 = steps
    assert float(step32.norm()) > 0
    assert float(step16.norm()) == pytest.approx(float(step32.norm()), rel=2e-2)
    assert float(F.cosine_similarity(step16, step32, dim=0)) > 0.999


@pytest.mark.slow
def test_ddp_step_equals_the_single_process_step_on_the_concatenated_batch(tmp_path):
    """Two gloo ranks of 32 samples each: DDP averages the mask logits' gradients, so one SGD step equals the
    step on the concatenated 64 samples (the mean cross-entropy over equal halves), and the ranks agree."""
    module, _, _ = _graft(sparsity=0.05)
    start = copy.deepcopy(module)
    trainer = tiny_trainer(strategy=SpawnDDP(), devices=2, limit_train_batches=1, limit_val_batches=0,
                           num_sanity_val_steps=0, callbacks=[SaveRankStep(tmp_path)])  # fmt: skip
    trainer.fit(module, datamodule=DigitsTasks("rotate90", batch_size=32))
    ranks = [torch.load(tmp_path / f"params_rank{r}.pt") for r in (0, 1)]  # the mask logits
    assert all(torch.equal(a, b) for a, b in zip(*ranks)), "mask logits differ between ranks"
    parts = [torch.load(tmp_path / f"batch_rank{r}.pt") for r in (0, 1)]
    assert all(len(part[0]) == 32 for part in parts)
    x = torch.cat([p[0] for p in parts])
    y = {"rotate90": torch.cat([p[1]["rotate90"] for p in parts])}
    optimizer = torch.optim.SGD(list(start.logits), lr=1e6)
    start.training_step((x, y), 0).backward()
    optimizer.step()
    moved = False
    for got, want, before in zip(ranks[0], start.logits, _graft(sparsity=0.05)[0].logits):
        assert torch.allclose(got, want.detach(), rtol=1e-5, atol=1e-4)
        moved = moved or not torch.equal(want.detach(), before.detach())
    assert moved  # the step is not zero, so the comparison says something
