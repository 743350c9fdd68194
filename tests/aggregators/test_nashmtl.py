import copy

import pytest
import torch

from lightning_mtl.aggregators import FairGrad, NashMTL
from tests.fixtures.jacobians import badly_scaled_jacobians


def _gram(m, n, seed, correlated=False):
    gen = torch.Generator().manual_seed(seed)
    jac = torch.randn(m, n, generator=gen, dtype=torch.float64) * torch.rand(m, 1, generator=gen, dtype=torch.float64)
    if correlated:
        jac = jac + 2 * torch.randn(1, n, generator=gen, dtype=torch.float64)
    return jac @ jac.T


@pytest.mark.parametrize("m,correlated", [(2, False), (3, True), (5, False), (8, True)])
def test_bargaining_equations_hold(m, correlated):
    gram = _gram(m, 20, m, correlated)
    alpha = NashMTL()(gram).double()
    assert (alpha > 0).all()
    torch.testing.assert_close(gram @ alpha, 1 / alpha, rtol=1e-5, atol=0)  # on the raw Gramian


def test_scale_invariance_and_warm_start():
    gram = _gram(4, 10, 0)
    agg = NashMTL()
    first = agg(gram)
    # G -> c^2 G (gradients times c) gives weights / c: the same direction
    torch.testing.assert_close(agg(1e4 * gram), first / 100, rtol=1e-5, atol=0)
    assert agg.alpha.dtype == torch.float64 and agg.step_count == 2


def test_update_weights_every():
    agg = NashMTL(update_weights_every=2)
    g1, g2, g3 = _gram(3, 10, 1), _gram(3, 10, 2), _gram(3, 10, 3)
    w1 = agg(g1)
    torch.testing.assert_close(agg(g2), w1)  # reused
    w3 = agg(g3)
    torch.testing.assert_close(w3, NashMTL()(g3), rtol=1e-5, atol=0)  # recomputed (warm start is irrelevant)
    fresh = NashMTL(update_weights_every=2)
    fresh.load_state_dict(copy.deepcopy(agg.state_dict()))
    torch.testing.assert_close(fresh(g1), agg(g1))  # step 4 reuses the weights of step 3


def test_zero_gradient_task_gets_zero_weight():
    gen = torch.Generator().manual_seed(4)
    jac = torch.randn(3, 8, generator=gen, dtype=torch.float64)
    jac[1] = 0
    gram = jac @ jac.T
    alpha = NashMTL()(gram).double()
    assert alpha[1] == 0
    sub = gram[[0, 2]][:, [0, 2]]
    torch.testing.assert_close(sub @ alpha[[0, 2]], 1 / alpha[[0, 2]], rtol=1e-5, atol=0)


@pytest.mark.parametrize("m,seed", [(2, 0), (3, 1), (5, 2), (8, 3)])
def test_direction_is_scale_free_with_length_sqrt_m(m, seed):
    """Navon et al. (2022), Eq. 3: ``a_i (G a)_i = 1``, so ``|d|^2 = a^T G a = m`` whatever the
    scale of the gradients, and ``d(c J) = d(J)``; FairGrad with alpha = 1 solves the same equations."""
    jac = torch.randn(m, 20, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    jac = jac * torch.logspace(-1, 1, m, dtype=torch.float64)[:, None]
    d = NashMTL().aggregate(jac)
    torch.testing.assert_close(d.norm(), torch.tensor(m**0.5, dtype=torch.float64), rtol=1e-5, atol=0)
    torch.testing.assert_close(d, FairGrad(alpha=1.0).aggregate(jac), rtol=1e-5, atol=1e-5 * m**0.5)
    for c in (1e-3, 0.1, 10.0, 1e3):
        torch.testing.assert_close(NashMTL().aggregate(c * jac), d, rtol=1e-5, atol=1e-5 * m**0.5)


@pytest.mark.parametrize("family", ["spread", "tiny"])
@pytest.mark.parametrize("m", [2, 3, 5])
def test_bargaining_equations_hold_on_badly_scaled_gradients(family, m):
    """Row norms over 1e-3..1e3, or one task 1e4..1e7 times smaller: still ``a_i (G a)_i = 1``."""
    for seed in range(3):
        jac = badly_scaled_jacobians(m, seed)[family].double()
        alpha = NashMTL()(jac @ jac.T).double()
        assert (alpha > 0).all()
        norms = jac.norm(dim=1)
        residual = alpha * (jac @ (alpha @ jac)) - 1
        # float32 weights: a_i (G a)_i is known to round-off of the size a_i |g_i| sum_j a_j |g_j|
        assert (residual.abs() <= 1e-5 * alpha * norms * (alpha @ norms)).all(), residual
