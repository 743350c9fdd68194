import pytest
import torch

from lightning_mtl.aggregators import IMTLG
from lightning_mtl.aggregators.imtl import imtl_g_weights


def _jac(m, n, seed):
    scales = torch.logspace(-1, 1, m, dtype=torch.float64)[:, None]  # very different gradient norms
    return scales * torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("m", [2, 3, 5, 8])
def test_equal_projections_on_unit_gradients(m):
    jac = _jac(m, 12, m)
    w = imtl_g_weights(jac @ jac.T)
    assert abs(float(w.sum()) - 1) < 1e-12
    d = w @ jac
    proj = jac @ d / jac.norm(dim=1)
    torch.testing.assert_close(proj, proj.mean().expand(m), rtol=1e-9, atol=1e-12)
    # the module returns the same weights in float32
    torch.testing.assert_close(IMTLG()(jac @ jac.T), w.float(), rtol=1e-5, atol=1e-6)


def test_paper_closed_form():
    """alpha_{2..m} = g_1 U^T (D U^T)^-1 with D, U the differences w.r.t. task 1 (Liu et al., 2021)."""
    jac = _jac(4, 9, 11)
    u = jac / jac.norm(dim=1, keepdim=True)
    d_mat = jac[:1] - jac[1:]
    u_mat = u[:1] - u[1:]
    alpha = jac[:1] @ u_mat.T @ torch.linalg.inv(d_mat @ u_mat.T)
    expected = torch.cat([1 - alpha.sum(1), alpha[0]])
    torch.testing.assert_close(imtl_g_weights(jac @ jac.T), expected, rtol=1e-9, atol=1e-12)


def test_zero_gradient_task_and_single_task():
    jac = _jac(4, 9, 12)
    jac[2] = 0
    w = imtl_g_weights(jac @ jac.T)
    assert w[2] == 0 and abs(float(w.sum()) - 1) < 1e-12
    active = [0, 1, 3]
    proj = jac[active] @ (w @ jac) / jac[active].norm(dim=1)
    torch.testing.assert_close(proj, proj.mean().expand(3), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(IMTLG()(torch.full((1, 1), 3.0)), torch.ones(1))
