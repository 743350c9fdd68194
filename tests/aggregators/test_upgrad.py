import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from lightning_mtl.aggregators import UPGrad
from lightning_mtl.aggregators.upgrad import dual_cone_projection_weights
from tests.fixtures.jacobians import badly_scaled_jacobians


def _jac(m, n, seed):
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _project_scipy(y, jac):
    """argmin_x |x - y|^2 s.t. J x >= 0, solved by SLSQP in R^n."""
    a = jac.numpy()
    res = minimize(
        lambda x: 0.5 * np.sum((x - y) ** 2),
        y,
        jac=lambda x: x - y,
        constraints={"type": "ineq", "fun": lambda x: a @ x, "jac": lambda x: a},
        method="SLSQP",
        options={"ftol": 1e-15, "maxiter": 1000},
    )
    return res.x


@pytest.mark.parametrize("m,n,seed", [(2, 4, 0), (3, 5, 1), (4, 8, 2), (5, 6, 3)])
def test_each_projection_matches_a_reference_qp(m, n, seed):
    jac = _jac(m, n, seed)
    gram = jac @ jac.T
    v = dual_cone_projection_weights(gram / gram.trace(), torch.eye(m, dtype=torch.float64))
    projections = v @ jac
    for i in range(m):
        expected = _project_scipy(jac[i].numpy(), jac)
        np.testing.assert_allclose(projections[i].numpy(), expected, rtol=0, atol=1e-6 * float(jac[i].norm()))
        assert (jac @ projections[i]).min() >= -1e-9 * float(gram.diagonal().max())
    assert (v >= torch.eye(m, dtype=torch.float64) - 1e-12).all()  # dual feasibility: v_i >= e_i


@pytest.mark.parametrize("m,seed", [(2, 4), (3, 5), (5, 6), (8, 7)])
def test_result_conflicts_with_no_task(m, seed):
    jac = _jac(m, 10, seed)
    jac[1] = -0.8 * jac[0] + 0.1 * jac[1]  # a strong conflict
    d = UPGrad().aggregate(jac)
    scale = float(jac.norm(dim=1).max() * d.norm())
    assert (jac @ d).min() >= -1e-6 * scale


def test_non_conflicting_is_the_mean_and_pref_vector():
    jac = torch.rand(4, 10, generator=torch.Generator().manual_seed(8), dtype=torch.float64)  # no conflict
    torch.testing.assert_close(UPGrad().aggregate(jac), jac.mean(0), rtol=1e-5, atol=1e-6)
    pref = [0.1, 0.2, 0.3, 0.4]
    torch.testing.assert_close(
        UPGrad(pref_vector=pref).aggregate(jac), torch.tensor(pref, dtype=torch.float64) @ jac, rtol=1e-5, atol=1e-6
    )
    with pytest.raises(ValueError):
        UPGrad(pref_vector=[1.0, -1.0])


def test_opposite_gradients_give_zero():
    jac = torch.tensor([[1.0, 2.0, 0.0], [-1.0, -2.0, 0.0]])
    assert UPGrad().aggregate(jac).abs().max() < 1e-4


@pytest.mark.parametrize("m,seed", [(3, 0), (10, 1), (25, 2)])
def test_active_set_solver_agrees_with_the_barrier_solver(m, seed):
    """The primal-dual active-set solve (the fast path) reaches a KKT-certified optimum of each
    projection QP, no worse than the barrier method (its fallback) and equal to it wherever the
    barrier's own result is certified, with strong conflicts among the gradients."""
    from lightning_mtl.aggregators._solvers import (
        Quadratic,
        active_set_box_qp,
        barrier_newton,
        kkt_certified,
        polish_quadratic,
        quadratic_finisher,
    )

    jac = _jac(m, 3 * m, seed)
    jac[1] = -jac[0] + 0.05 * jac[1]
    gram = jac @ jac.T
    gram = gram / gram.trace()
    u = torch.eye(m, dtype=torch.float64) / m
    q, c = gram.expand(m, m, m), torch.zeros(m, m, dtype=torch.float64)
    x_as, certified = active_set_box_qp(gram, c, u)
    assert certified.all() and kkt_certified(q, c, u, x_as, simplex=False).all()
    finish = quadratic_finisher(q, c, u, simplex=False)
    x_bn, t, _ = barrier_newton(Quadratic(q, c), u + 1.0, u, simplex=False, finish=finish)
    x_bn = polish_quadratic(q, c, u, x_bn, t, simplex=False)
    objective = lambda x: 0.5 * ((x @ gram) * x).sum(-1)  # noqa: E731
    assert (objective(x_as) <= objective(x_bn) + 1e-15).all()
    both = kkt_certified(q, c, u, x_bn, simplex=False)
    assert both.any()
    torch.testing.assert_close((x_as @ jac)[both], (x_bn @ jac)[both], atol=1e-7, rtol=0)


def test_uncertified_active_set_falls_back_to_the_barrier_solver(monkeypatch):
    import lightning_mtl.aggregators.upgrad as upgrad

    jac = _jac(6, 12, 3)
    jac[1] = -jac[0] + 0.05 * jac[1]
    gram = jac @ jac.T / (jac @ jac.T).trace()
    u = torch.eye(6, dtype=torch.float64)
    expected = dual_cone_projection_weights(gram, u)
    # zero iterations leave the start point x = lower, which is not optimal here
    monkeypatch.setattr(
        upgrad, "active_set_box_qp", lambda q, c, lower: (lower.clone(), torch.zeros(6, dtype=torch.bool))
    )
    torch.testing.assert_close(dual_cone_projection_weights(gram, u), expected, atol=1e-8, rtol=0)


@pytest.mark.parametrize("family", ["spread", "tiny"])
@pytest.mark.parametrize("m", [2, 3, 5])
def test_no_conflict_with_badly_scaled_gradients(family, m):
    """A task 1e4..1e7 times smaller than the others (or norms over 1e-3..1e3) is not swamped by the
    regularisation: ``g_i . d >= 0`` to float32 round-off, relative to the scale of each task."""
    for seed in range(4):
        jac = badly_scaled_jacobians(m, seed)[family].double()
        w = UPGrad()(jac @ jac.T).double()
        norms = jac.norm(dim=1)
        slack = jac @ (w @ jac) / (norms * (w.abs() @ norms))
        assert slack.min() >= -1e-6, (seed, slack)
