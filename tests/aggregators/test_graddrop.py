import torch

from lightning_mtl.aggregators import GradDrop


def test_same_sign_columns_are_kept():
    gen = torch.Generator().manual_seed(0)
    signs = torch.where(torch.rand(50, generator=gen) < 0.5, -1.0, 1.0)
    jac = torch.rand(4, 50, generator=gen) * signs  # every column has a single sign
    torch.testing.assert_close(GradDrop(seed=0)(jac), jac.sum(0))


def test_each_coordinate_keeps_one_sign():
    gen = torch.Generator().manual_seed(1)
    jac = torch.randn(5, 200, generator=gen)
    out = GradDrop(seed=1)(jac)
    pos = jac.clamp(min=0).sum(0)
    neg = jac.clamp(max=0).sum(0)
    assert torch.all(torch.isclose(out, pos) | torch.isclose(out, neg))
    assert torch.isclose(out, pos).any() and torch.isclose(out, neg).any()


def test_sign_purity_sets_the_keep_probability():
    n = 20000
    jac = torch.stack([torch.full((n,), 3.0), torch.full((n,), -1.0)])  # P = (1 + 2/4) / 2 = 0.75
    out = GradDrop(seed=2)(jac)
    kept_positive = (out == 3.0).float().mean()
    assert abs(float(kept_positive) - 0.75) < 0.015
    assert torch.all((out == 3.0) | (out == -1.0))


def test_leakage_and_reproducibility():
    jac = torch.randn(3, 30, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(GradDrop(leakage=1.0, seed=0)(jac), jac.sum(0))
    a, b = GradDrop(seed=5), GradDrop(seed=5)
    torch.testing.assert_close(a(jac), b(jac))
    assert not torch.equal(a(jac), GradDrop(seed=6)(jac))
