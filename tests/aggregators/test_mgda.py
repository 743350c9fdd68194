import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from lightning_mtl.aggregators import MGDA
from lightning_mtl.aggregators._solvers import min_norm_point
from lightning_mtl.aggregators.mgda import min_norm_weights
from tests.fixtures.jacobians import badly_scaled_jacobians


def _problems():
    gen = torch.Generator().manual_seed(0)
    for m, n in [(2, 5), (3, 5), (5, 10), (8, 20), (5, 3), (8, 2)]:  # the last two: m > n, singular G
        yield torch.randn(m, n, generator=gen, dtype=torch.float64)
    jac = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    jac[1] = jac[0]  # repeated gradient
    yield jac
    yield torch.randn(3, 6, generator=gen, dtype=torch.float64) * 1e-6  # tiny scale
    yield torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]], dtype=torch.float64)  # a point on the segment


def _check_kkt(gram, w, tol):
    scale = gram.diagonal().mean()
    value = w @ gram @ w
    slack = (gram @ w - value) / scale
    assert w.min() >= 0 and abs(w.sum() - 1) < 1e-9
    assert slack.min() >= -tol, slack  # (G w)_i >= w^T G w for every task
    assert slack[w > 1e-8].abs().max() <= tol  # with equality on the support


@pytest.mark.parametrize("jac", list(_problems()))
def test_min_norm_weights_satisfy_kkt(jac):
    gram = jac @ jac.T
    _check_kkt(gram, min_norm_weights(gram), tol=1e-8)
    # through the module (float32 weights) the same holds to float32 accuracy
    w = MGDA()(gram).double()
    _check_kkt(gram, w / w.sum(), tol=1e-5)


def _grid_min(gram, steps=200):
    m = gram.shape[0]
    best = np.inf
    for idx in itertools.product(range(steps + 1), repeat=m - 1):
        if sum(idx) > steps:
            continue
        w = np.array([*idx, steps - sum(idx)], dtype=float) / steps
        best = min(best, w @ gram @ w)
    return best


@pytest.mark.parametrize("m", [2, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force_and_slsqp(m, seed):
    gen = torch.Generator().manual_seed(seed)
    jac = torch.randn(m, 4, generator=gen, dtype=torch.float64)
    gram = jac @ jac.T
    w = min_norm_weights(gram)
    ours = float(w @ gram @ w)
    a = gram.numpy()
    assert ours <= _grid_min(a) + 1e-12  # never worse than any point of a dense grid of the simplex
    res = minimize(
        lambda x: x @ a @ x,
        np.full(m, 1.0 / m),
        jac=lambda x: 2 * a @ x,
        bounds=[(0, 1)] * m,
        constraints=({"type": "eq", "fun": lambda x: x.sum() - 1},),
        method="SLSQP",
        options={"ftol": 1e-15, "maxiter": 500},
    )
    assert ours <= res.fun + 1e-10
    np.testing.assert_allclose(ours, res.fun, rtol=1e-6, atol=1e-12)


def test_two_tasks_closed_form():
    g1 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    g2 = torch.tensor([-0.5, 1.0], dtype=torch.float64)
    jac = torch.stack([g1, g2])
    gamma = float(((g2 - g1) @ g2) / (g1 - g2).square().sum())  # min |gamma g1 + (1 - gamma) g2|
    torch.testing.assert_close(min_norm_weights(jac @ jac.T), torch.tensor([gamma, 1 - gamma], dtype=torch.float64))
    d = MGDA().aggregate(jac)
    assert (jac @ d).min() > 0  # a common descent direction


def test_degenerate_inputs():
    torch.testing.assert_close(MGDA()(torch.ones(1, 1)), torch.ones(1))
    torch.testing.assert_close(MGDA()(torch.zeros(3, 3)), torch.full((3,), 1 / 3))
    # 0 is in the convex hull: the min-norm point is 0
    jac = torch.tensor([[1.0, 2.0], [-1.0, -2.0], [0.3, 0.1]])
    assert MGDA().aggregate(jac).abs().max() < 1e-6


def test_l2_normalization_is_mgda_on_unit_gradients():
    gen = torch.Generator().manual_seed(5)
    scales = torch.tensor([[1.0], [10.0], [0.1], [3.0]], dtype=torch.float64)
    jac = torch.randn(4, 7, generator=gen, dtype=torch.float64) * scales
    unit = jac / jac.norm(dim=1, keepdim=True)
    expected = min_norm_weights(unit @ unit.T)
    got = MGDA(normalization="l2")(jac @ jac.T).double()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        MGDA(normalization="loss")


@pytest.mark.parametrize("family", ["spread", "tiny"])
@pytest.mark.parametrize("m", [2, 3, 5])
def test_kkt_with_badly_scaled_gradients(family, m):
    """One gradient 1e4..1e7 times smaller than the others puts the min-norm point at about 1e-12 of
    the normalised scale: still ``g_i . d >= |d|^2`` for every task, with equality on the support,
    to a tolerance relative to ``|g_i| |d|`` (the size of ``g_i . d``)."""
    for seed in range(4):
        jac = badly_scaled_jacobians(m, seed)[family].double()
        gram = jac @ jac.T
        w = min_norm_weights(gram)
        assert w.min() >= 0 and abs(float(w.sum()) - 1) < 1e-12
        d = w @ jac
        scale = jac.norm(dim=1) * d.norm()
        slack = (jac @ d - d @ d) / scale
        assert slack.min() >= -1e-7, (seed, slack)
        assert slack[w > 0].abs().max() <= 1e-7, (seed, slack, w)


@pytest.mark.parametrize("jac", list(_problems()))
def test_wolfe_fallback_satisfies_kkt(jac):
    """The fallback alone (Wolfe's algorithm) solves the regular and the degenerate problems too:
    repeated gradients, m > n, and 0 in the convex hull."""
    gram = jac @ jac.T
    _check_kkt(gram, min_norm_point(gram / gram.diagonal().mean()), tol=1e-8)


def test_wolfe_fallback_finds_zero_in_the_hull():
    jac = torch.tensor([[1.0, 2.0], [-1.0, -2.0], [0.3, 0.1]], dtype=torch.float64)
    w = min_norm_point(jac @ jac.T)
    assert w.min() >= 0 and abs(float(w.sum()) - 1) < 1e-12
    assert (w @ jac).norm() < 1e-12
