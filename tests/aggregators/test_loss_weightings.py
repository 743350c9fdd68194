"""Loss weightings: uncertainty weighting, RLW, DWA, FAMO and GradNorm against their formulas."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_mtl.aggregators import FAMO, DynamicWeightAverage, GradNorm, RandomLossWeighting, UncertaintyWeighting


def _bound(agg, m):
    agg.bind_tasks(tuple(f"t{i}" for i in range(m)))
    return agg


def test_uncertainty_weighting_formula_and_optimum():
    agg = _bound(UncertaintyWeighting(), 3)
    losses = torch.tensor([0.5, 2.0, 8.0])
    with torch.no_grad():
        agg.log_vars.copy_(torch.tensor([0.1, -0.2, 0.3]))
    expected = (torch.exp(-agg.log_vars) * losses + agg.log_vars).sum()
    assert torch.allclose(agg(losses), expected)
    # for fixed losses, gradient descent on s reaches s_i = log l_i (every weighted loss 1)
    opt = torch.optim.SGD(agg.parameters(), lr=0.2)
    for _ in range(500):
        opt.zero_grad()
        agg(losses).backward()
        opt.step()
    assert torch.allclose(agg.log_vars.detach(), losses.log(), atol=1e-3)


def test_rlw_weights_are_softmax_of_normals_reproducible_and_unbiased():
    a, b = RandomLossWeighting(seed=3), RandomLossWeighting(seed=3)
    losses = torch.ones(4)
    draws = torch.stack([a.weights(losses) for _ in range(4000)])
    assert torch.allclose(draws.sum(1), torch.ones(4000))
    assert (draws > 0).all()
    assert torch.equal(draws[:5], torch.stack([b.weights(losses) for _ in range(5)]))
    assert not torch.equal(draws[0], draws[1])
    assert torch.allclose(draws.mean(0), torch.full((4,), 0.25), atol=0.01)  # exchangeable tasks
    # the first draw is softmax of a standard normal vector from the (seed, 0) generator
    z = torch.randn(4, generator=torch.Generator().manual_seed(3 * 1_000_003))
    assert torch.allclose(draws[0], torch.softmax(z, 0))


def test_dwa_weights_follow_the_epoch_mean_loss_ratios():
    agg = _bound(DynamicWeightAverage(temperature=2.0), 2)
    epochs = [[[4.0, 1.0], [2.0, 1.0]], [[2.0, 0.9], [2.0, 0.9]], [[1.0, 0.8]]]  # per-step losses
    seen = []
    for steps in epochs:
        for losses in steps:
            losses = torch.tensor(losses)
            seen.append(agg.weights(losses))
            agg(losses)
        agg.on_train_epoch_end(lambda t: t)
    assert torch.equal(seen[0], torch.ones(2)) and torch.equal(seen[3], torch.ones(2))
    # epoch means: t-2 = (3.0, 1.0), t-1 = (2.0, 0.9): r = (2/3, 0.9); w = 2 softmax(r / 2)
    r = torch.tensor([2.0 / 3.0, 0.9])
    assert torch.allclose(seen[4], 2 * torch.softmax(r / 2, 0))


def test_famo_objective_and_logit_update_match_the_paper():
    agg = _bound(FAMO(lr=0.025, weight_decay=1e-3), 3)
    with torch.no_grad():
        agg.logits.copy_(torch.tensor([0.2, -0.1, 0.0]))
    losses = torch.tensor([1.5, 0.3, 2.0], requires_grad=True)
    z = torch.softmax(agg.logits, 0)
    c = 1 / (z / losses.detach()).sum()
    expected = (c * z * (losses + 1e-8).log()).sum()
    assert torch.allclose(agg(losses), expected)

    # the logit step is Adam (weight decay gamma) on J_softmax(w)^T delta, as torch.optim.Adam does it
    w = torch.nn.Parameter(agg.logits.clone())
    reference = torch.optim.Adam([w], lr=0.025, weight_decay=1e-3)
    for before, after in ([[1.5, 0.3, 2.0], [1.2, 0.29, 1.9]], [[1.2, 0.29, 1.9], [1.0, 0.28, 1.7]]):
        before, after = torch.tensor(before), torch.tensor(after)
        delta = (before + 1e-8).log() - (after + 1e-8).log()
        reference.zero_grad()
        w.grad = torch.autograd.grad(torch.softmax(w, 0), w, grad_outputs=delta)[0]
        reference.step()
        agg.after_step(before, after)
        assert torch.allclose(agg.logits, w.detach(), atol=1e-6)


def test_famo_balances_the_rates_at_which_losses_fall():
    """Two tasks with their own coordinate, one far from its optimum: under a fixed weighting the
    near task's log-loss falls 9x faster; FAMO moves weight until both fall at the same rate."""

    def run(logit_lr):
        agg = _bound(FAMO(lr=logit_lr, weight_decay=0.0), 2)
        theta = torch.nn.Parameter(torch.tensor([1.0, 3.0]))
        opt = torch.optim.SGD([theta], lr=0.002)
        rates = None
        for _ in range(300):
            losses = theta.pow(2) + 1e-3
            opt.zero_grad()
            agg(losses).backward()
            opt.step()
            after = theta.detach().pow(2) + 1e-3
            rates = losses.detach().log() - after.log()
            agg.after_step(losses.detach(), after)
        return rates

    fixed, famo = run(0.0), run(0.05)
    assert (fixed[0] / fixed[1]).log().abs() > 1.0
    assert (famo[0] / famo[1]).log().abs() < 0.1


def test_gradnorm_weight_gradient_and_renormalization():
    agg = _bound(GradNorm(alpha=1.5), 3)
    with torch.no_grad():
        agg.loss_weights.copy_(torch.tensor([1.0, 0.5, 1.5]))
    first = torch.tensor([2.0, 1.0, 4.0])
    norms = torch.tensor([1.0, 3.0, 0.5])
    agg(first, grad_norms=norms)  # records l(0)
    agg.zero_grad()
    losses = torch.tensor([1.0, 0.9, 2.0], requires_grad=True)
    objective = agg(losses, grad_norms=norms)
    w = agg.loss_weights.detach()
    assert torch.allclose(objective, (w * losses).sum())  # the value is the weighted task loss
    objective.backward()
    ratio = losses.detach() / first
    g = w * norms
    target = g.mean() * (ratio / ratio.mean()) ** 1.5
    assert torch.allclose(agg.loss_weights.grad, torch.sign(g - target) * norms)
    assert torch.allclose(losses.grad, w)  # the network follows sum w_i l_i with w held constant
    agg.after_step()
    assert agg.loss_weights.sum().item() == pytest.approx(3.0)
    assert math.isclose(float(agg.loss_weights[1] / agg.loss_weights[0]), 0.5, rel_tol=1e-6)


def test_logged_weights_are_the_ones_used():
    """RLW draws new weights at every call: the module logs ``last_weights``, not a second draw."""
    agg = _bound(RandomLossWeighting(seed=0), 3)
    losses = torch.tensor([1.0, 2.0, 3.0])
    objective = agg(losses)
    assert torch.allclose(objective, (agg.last_weights * losses).sum())
    assert agg.calls == 1


def test_scale_invariant_ls_gradient_does_not_see_loss_scales():
    from lightning_mtl.aggregators import ScaleInvariantLS

    theta = torch.nn.Parameter(torch.tensor([0.7, -1.3]))
    grads = []
    for scales in ([1.0, 1.0], [1000.0, 0.01]):
        losses = torch.tensor(scales) * (theta - torch.tensor([1.0, 2.0])).pow(2)
        objective = ScaleInvariantLS(eps=0.0)(losses)
        assert torch.allclose(objective, losses.log().sum())
        grads.append(torch.autograd.grad(objective, theta)[0])
    assert torch.allclose(grads[0], grads[1])
