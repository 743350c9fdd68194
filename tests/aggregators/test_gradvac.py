import copy

import pytest
import torch

from lightning_mtl.aggregators import GradVac, PCGrad
from lightning_mtl.aggregators.gradvac import gradvac_coefficients


def _cos(a, b):
    return float(a @ b / (a.norm() * b.norm()))


def test_ema_update_is_hand_computed_and_no_change_when_above_target():
    beta = 0.1
    agg = GradVac(beta=beta, seed=0)
    jac1 = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)  # cos = 0.707 > 0 = target
    d = agg.aggregate(jac1)
    torch.testing.assert_close(d, jac1.sum(0))  # no correction above the target
    c1 = _cos(jac1[0], jac1[1])
    expected = torch.tensor([[0.0, beta * c1], [beta * c1, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(agg.phi_hat, expected)
    jac2 = torch.tensor([[1.0, 0.0], [-1.0, 2.0]], dtype=torch.float64)  # cos = -0.447 < target
    agg.aggregate(jac2)
    c2 = _cos(jac2[0], jac2[1])
    expected = (1 - beta) * expected + beta * torch.tensor([[0.0, c2], [c2, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(agg.phi_hat, expected)


def test_correction_reaches_the_target_cosine():
    jac = torch.tensor([[1.0, 0.0, 0.0], [-0.5, 1.0, 0.5]], dtype=torch.float64)
    gram = jac @ jac.T
    target = torch.tensor([[0.0, 0.6], [0.3, 0.0]], dtype=torch.float64)
    orders = torch.tensor([[1], [0]])
    coef, _ = gradvac_coefficients(gram, orders, target, beta=0.0, eps=0.0)
    new = coef @ jac
    assert abs(_cos(new[0], jac[1]) - 0.6) < 1e-9
    assert abs(_cos(new[1], jac[0]) - 0.3) < 1e-9


@pytest.mark.parametrize("m", [3, 5])
def test_zero_beta_is_pcgrad(m):
    """With beta = 0 the targets stay 0 and GradVac is PCGrad (same random orders)."""
    gen = torch.Generator().manual_seed(m)
    jac = torch.randn(m, 10, generator=gen, dtype=torch.float64)
    vac, pc = GradVac(beta=0.0, seed=3), PCGrad(seed=3)
    for _ in range(3):
        torch.testing.assert_close(vac.aggregate(jac), pc.aggregate(jac), rtol=1e-6, atol=1e-6)


def test_phi_hat_is_a_checkpointed_buffer():
    agg = GradVac(seed=1)
    agg(torch.eye(3) - 0.4)
    assert "phi_hat" in agg.state_dict() and agg.state_dict()["phi_hat"].shape == (3, 3)
    fresh = GradVac(seed=2)
    fresh.load_state_dict(copy.deepcopy(agg.state_dict()))
    torch.testing.assert_close(fresh.phi_hat, agg.phi_hat)
    assert fresh.seed == 1
