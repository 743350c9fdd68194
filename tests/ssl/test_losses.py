"""The Barlow Twins and Mixed Barlow Twins losses against direct computations of their formulas."""

from __future__ import annotations

import pytest
import torch

from lightning_mtl.ssl.losses import (
    barlow_twins_loss,
    cross_correlation,
    mixed_barlow_twins_loss,
    mixed_targets,
    standardize,
)


def _fixed(n=24, d=6, views=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(n, d, generator=generator, dtype=torch.float64)
    return [base + 0.7 * torch.randn(n, d, generator=generator, dtype=torch.float64) * (i + 1) for i in range(views)]


def _standardize_by_hand(z):
    """Per dimension: subtract the mean, divide by the unbiased standard deviation (loops, no broadcasting tricks)."""
    n, d = z.shape
    out = torch.empty_like(z)
    for j in range(d):
        column = z[:, j]
        mean = sum(column.tolist()) / n
        var = sum((v - mean) ** 2 for v in column.tolist()) / (n - 1)
        out[:, j] = (column - mean) / var**0.5
    return out


def _bt_by_hand(z_a, z_b, lambda_bt):
    za, zb = _standardize_by_hand(z_a), _standardize_by_hand(z_b)
    n, d = za.shape
    loss = 0.0
    for i in range(d):
        for j in range(d):
            c_ij = sum(za[k, i].item() * zb[k, j].item() for k in range(n)) / n
            loss += (1 - c_ij) ** 2 if i == j else lambda_bt * c_ij**2
    return loss


def test_identical_decorrelated_views_reference_value():
    """Zero-mean orthogonal columns, identical views: C = (N - 1) / N * I (unbiased std), so the loss is
    d * (1 / N)^2 whatever lambda_BT."""
    z = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [1.0, -1.0], [-1.0, -1.0]])
    for lambda_bt in (0.0, 0.5, 3.0):
        terms = barlow_twins_loss(z, z.clone(), lambda_bt, eps=0.0)
        assert float(terms.loss) == pytest.approx(2 * 0.25**2)
        assert float(terms.off_diag) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("lambda_bt", [1 / 128, 0.3])
def test_barlow_twins_loss_equals_formula_by_hand(lambda_bt):
    z_a, z_b, _ = _fixed()
    terms = barlow_twins_loss(z_a.float(), z_b.float(), lambda_bt, eps=0.0)
    assert float(terms.loss) == pytest.approx(_bt_by_hand(z_a, z_b, lambda_bt), rel=1e-5)
    assert float(terms.loss) == pytest.approx(float(terms.on_diag + lambda_bt * terms.off_diag), rel=1e-6)
    assert float(terms.loss_reg) == 0.0


def test_standardize_and_cross_correlation():
    z_a, z_b, _ = _fixed()
    za = standardize(z_a, eps=0.0)
    assert torch.allclose(za, _standardize_by_hand(z_a))
    stacked = standardize(torch.stack([z_a, z_b]), eps=0.0)
    assert torch.allclose(stacked[1], _standardize_by_hand(z_b))
    c = cross_correlation(za, stacked[1])
    assert torch.allclose(c, za.T @ stacked[1] / len(za))
    with pytest.raises(ValueError, match="at least 2"):
        standardize(torch.randn(1, 3))


def _mixed_by_formula(z_a, z_b, z_m, alpha, perm, lambda_bt, lambda_reg):
    """METHODS.md's formula, term by term: C_MA, C_MB, C_MA*, C_MB* and the squared Frobenius norms."""
    za, zb, zm = (_standardize_by_hand(z) for z in (z_a, z_b, z_m))
    n = len(za)
    c_ma, c_mb = zm.T @ za / n, zm.T @ zb / n
    t_ma = (alpha * za.T @ za + (1 - alpha) * zb[perm].T @ za) / n
    t_mb = (alpha * za.T @ zb + (1 - alpha) * zb[perm].T @ zb) / n
    reg = lambda_reg * lambda_bt * ((c_ma - t_ma).square().sum() + (c_mb - t_mb).square().sum())
    return _bt_by_hand(z_a, z_b, lambda_bt), float(reg)


@pytest.mark.parametrize("alpha", [0.0, 0.37, 1.0])
def test_mixed_loss_equals_formula(alpha):
    z_a, z_b, z_m = _fixed()
    perm = torch.randperm(len(z_a), generator=torch.Generator().manual_seed(3))
    terms = mixed_barlow_twins_loss(z_a.float(), z_b.float(), z_m.float(), alpha, perm, 1 / 32, 4.0, eps=0.0)
    bt, reg = _mixed_by_formula(z_a, z_b, z_m, alpha, perm, 1 / 32, 4.0)
    assert float(terms.loss_bt) == pytest.approx(bt, rel=1e-5)
    assert float(terms.loss_reg) == pytest.approx(reg, rel=1e-4)
    assert float(terms.loss) == pytest.approx(bt + reg, rel=1e-5)


def test_mixed_targets_match_the_readme_form_not_the_imagenet_form():
    z_a, z_b, _ = _fixed()
    za, zb = _standardize_by_hand(z_a), _standardize_by_hand(z_b)
    perm = torch.randperm(len(za), generator=torch.Generator().manual_seed(1))
    alpha, n = 0.25, len(za)
    _, c_mb = mixed_targets(za, zb, alpha, perm)
    readme = (alpha * za.T @ zb + (1 - alpha) * zb[perm].T @ zb) / n
    imagenet = (alpha * zb.T @ zb + (1 - alpha) * zb[perm].T @ zb) / n
    assert torch.allclose(c_mb, readme)
    assert not torch.allclose(c_mb, imagenet, atol=1e-3)


def test_targets_for_alpha_one_and_zero():
    """alpha = 1: the mixed input is view A, the targets are A's own correlations with A and B.
    alpha = 0: the mixed input is B[pi], the targets are B[pi]'s correlations. Either way an embedding
    that is exactly that input's embedding meets its targets: the regularizer is 0."""
    z_a, z_b, _ = _fixed()
    za, zb = _standardize_by_hand(z_a), _standardize_by_hand(z_b)
    n = len(za)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(2))
    t_ma, t_mb = mixed_targets(za, zb, 1.0, perm)
    assert torch.allclose(t_ma, za.T @ za / n) and torch.allclose(t_mb, za.T @ zb / n)
    t_ma, t_mb = mixed_targets(za, zb, 0.0, perm)
    assert torch.allclose(t_ma, zb[perm].T @ za / n) and torch.allclose(t_mb, zb[perm].T @ zb / n)

    reg_one = mixed_barlow_twins_loss(z_a, z_b, z_a.clone(), 1.0, perm, 1 / 32, 4.0).loss_reg
    reg_zero = mixed_barlow_twins_loss(z_a, z_b, z_b[perm].clone(), 0.0, perm, 1 / 32, 4.0).loss_reg
    assert float(reg_one) == pytest.approx(0.0, abs=1e-10)
    assert float(reg_zero) == pytest.approx(0.0, abs=1e-10)
    # and a mixed embedding that is not the interpolation is penalized
    assert float(mixed_barlow_twins_loss(z_a, z_b, z_b.clone(), 1.0, perm, 1 / 32, 4.0).loss_reg) > 1e-3


def test_lambda_reg_zero_is_plain_barlow_twins():
    z_a, z_b, z_m = _fixed()
    perm = torch.randperm(len(z_a))
    mixed = mixed_barlow_twins_loss(z_a, z_b, z_m, 0.4, perm, 1 / 16, 0.0)
    plain = barlow_twins_loss(z_a, z_b, 1 / 16)
    assert float(mixed.loss_reg) == 0.0
    assert torch.allclose(mixed.loss, plain.loss)


def test_gradients_match_the_direct_formula():
    """The factored regularizer (R^T Z_A, R^T Z_B) has the gradients of the six-product formula."""
    z_a, z_b, z_m = (z.float().requires_grad_() for z in _fixed())
    perm = torch.randperm(len(z_a), generator=torch.Generator().manual_seed(5))
    ours = mixed_barlow_twins_loss(z_a, z_b, z_m, 0.6, perm, 1 / 8, 2.0, eps=0.0).loss
    grads = torch.autograd.grad(ours, (z_a, z_b, z_m))
    za, zb, zm = (standardize(z, eps=0.0) for z in (z_a, z_b, z_m))
    n = len(za)
    c = za.T @ zb / n
    t_ma, t_mb = mixed_targets(za, zb, 0.6, perm)
    off = c.square().sum() - torch.diagonal(c).square().sum()
    direct = (1 - torch.diagonal(c)).square().sum() + off / 8
    direct = direct + 2.0 / 8 * ((zm.T @ za / n - t_ma).square().sum() + (zm.T @ zb / n - t_mb).square().sum())
    for ours_grad, direct_grad in zip(grads, torch.autograd.grad(direct, (z_a, z_b, z_m))):
        assert torch.allclose(ours_grad, direct_grad, atol=1e-5, rtol=1e-4)


def test_loss_runs_in_float32_under_autocast():
    z_a, z_b, z_m = (z.float() for z in _fixed())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = mixed_barlow_twins_loss(z_a, z_b, z_m, 0.5, torch.arange(len(z_a)), 1 / 8, 4.0)
    assert terms.loss.dtype == torch.float32
    assert torch.allclose(
        terms.loss, mixed_barlow_twins_loss(z_a, z_b, z_m, 0.5, torch.arange(len(z_a)), 1 / 8, 4.0).loss
    )
