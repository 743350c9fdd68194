import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from lightning_mtl.aggregators import UPGrad
from lightning_mtl.aggregators.upgrad import dual_cone_projection_weights


def _jac(m, n, seed):
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _project_scipy(y, jac):
    """argmin_x |x - y|^2 s.t. J x >= 0, solved by SLSQP in R^n."""
    a = jac.numpy()
    res = minimize(lambda x: 0.5 * np.sum((x - y) ** 2), y, jac=lambda x: x - y,
                   constraints={"type": "ineq", "fun": lambda x: a @ x, "jac": lambda x: a},
                   method="SLSQP", options={"ftol": 1e-15, "maxiter": 1000})
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
    torch.testing.assert_close(UPGrad(pref_vector=pref).aggregate(jac), torch.tensor(pref, dtype=torch.float64) @ jac,
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        UPGrad(pref_vector=[1.0, -1.0])


def test_opposite_gradients_give_zero():
    jac = torch.tensor([[1.0, 2.0, 0.0], [-1.0, -2.0, 0.0]])
    assert UPGrad().aggregate(jac).abs().max() < 1e-4
