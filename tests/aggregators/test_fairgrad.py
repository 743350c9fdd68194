import pytest
import torch

from lightning_mtl.aggregators import FairGrad, NashMTL
from tests.fixtures.jacobians import badly_scaled_jacobians


def _gram(m, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    jac = torch.randn(m, 15, generator=gen, dtype=torch.float64) * torch.rand(m, 1, generator=gen, dtype=torch.float64)
    return scale * (jac @ jac.T)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("m,scale", [(2, 1.0), (4, 1e-4), (6, 1e3)])
def test_fairness_equations_hold_on_the_raw_gramian(alpha, m, scale):
    gram = _gram(m, m, scale)
    w = FairGrad(alpha=alpha)(gram).double()
    assert (w > 0).all()
    torch.testing.assert_close(gram @ w, w.pow(-1 / alpha), rtol=2e-5, atol=0)


def test_alpha_one_is_the_nash_direction():
    gram = _gram(4, 7)
    fair, nash = FairGrad(alpha=1.0)(gram).double(), NashMTL()(gram).double()
    torch.testing.assert_close(fair / fair.sum(), nash / nash.sum(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("family", ["spread", "tiny"])
def test_fairness_equations_hold_on_badly_scaled_gradients(alpha, family):
    """Row norms over 1e-3..1e3, or one task 1e4..1e7 times smaller: the regularisation of the
    solver must not swamp the small tasks' equations ``(G w)_i = w_i^(-1/alpha)``."""
    for m, seed in [(2, 0), (3, 1), (5, 2)]:
        jac = badly_scaled_jacobians(m, seed)[family].double()
        gram = jac @ jac.T
        w = FairGrad(alpha=alpha)(gram).double()
        assert (w > 0).all()
        # float32 weights: (G w)_i is known to round-off of the size |g_i| sum_j |w_j| |g_j|
        scale = jac.norm(dim=1) * (w @ jac.norm(dim=1))
        assert ((gram @ w - w.pow(-1 / alpha)).abs() <= 1e-5 * scale).all()
