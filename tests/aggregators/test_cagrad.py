import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from lightning_mtl.aggregators import CAGrad


def _jac(m, n, seed):
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("rescale", [0, 1, 2])
def test_c_zero_is_the_mean(rescale):
    jac = _jac(4, 9, 0)
    agg = CAGrad(c=0.0, rescale=rescale)
    torch.testing.assert_close(agg(jac @ jac.T), torch.full((4,), 0.25))
    torch.testing.assert_close(agg.aggregate(jac), jac.mean(0), rtol=1e-6, atol=1e-7)


def _primal_optimum(jac, c):
    """max_d min_i g_i . d subject to |d - g0| <= c |g0|, solved by SLSQP in the n-dim primal."""
    a = jac.numpy()
    n = a.shape[1]
    g0 = a.mean(0)
    radius = c * np.linalg.norm(g0)
    cons = [
        {"type": "ineq", "fun": lambda z: a @ z[:n] - z[n], "jac": lambda z: np.hstack([a, -np.ones((a.shape[0], 1))])},
        {
            "type": "ineq",
            "fun": lambda z: radius**2 - np.sum((z[:n] - g0) ** 2),
            "jac": lambda z: np.append(-2 * (z[:n] - g0), 0.0),
        },
    ]
    start = np.append(g0, (a @ g0).min())
    res = minimize(
        lambda z: -z[n],
        start,
        jac=lambda z: np.append(np.zeros(n), -1.0),
        constraints=cons,
        method="SLSQP",
        options={"ftol": 1e-15, "maxiter": 1000},
    )
    d = res.x[:n]
    assert np.sum((d - g0) ** 2) <= radius**2 * (1 + 1e-8)
    return (a @ d).min()


@pytest.mark.parametrize("m,n,c,seed", [(2, 5, 0.4, 0), (3, 5, 0.4, 1), (4, 6, 0.5, 2), (5, 8, 1.0, 3), (3, 4, 0.1, 4)])
def test_direction_is_the_constrained_optimum(m, n, c, seed):
    jac = _jac(m, n, seed)
    d = CAGrad(c=c, rescale=0).aggregate(jac)
    g0 = jac.mean(0)
    # feasible: inside the ball (on its boundary, since c > 0 and the problem is not degenerate)
    assert (d - g0).norm() <= c * g0.norm() * (1 + 1e-5)
    assert (d - g0).norm() >= c * g0.norm() * (1 - 1e-4)
    # optimal: the worst-case improvement matches the primal solved by SLSQP in R^n
    ours = float((jac @ d).min())
    best = _primal_optimum(jac, c)
    assert ours >= best - 1e-5 * float(jac.square().sum(1).mean())


def test_rescale_factors():
    jac = _jac(3, 7, 9)
    gram = jac @ jac.T
    w0 = CAGrad(c=0.4, rescale=0)(gram)
    torch.testing.assert_close(CAGrad(c=0.4, rescale=1)(gram), w0 / (1 + 0.4**2))
    torch.testing.assert_close(CAGrad(c=0.4, rescale=2)(gram), w0 / 1.4)
    with pytest.raises(ValueError):
        CAGrad(rescale=3)


def test_improves_the_worst_task_over_the_mean():
    jac = torch.tensor([[1.0, 0.0], [-0.9, 0.5]], dtype=torch.float64)
    d = CAGrad(c=0.4, rescale=0).aggregate(jac)
    assert (jac @ d).min() > (jac @ jac.mean(0)).min()
