import pytest
import torch

from lightning_mtl.aggregators import AlignedMTL
from lightning_mtl.aggregators.aligned_mtl import balance_matrix


def _jac(m, n, seed):
    scales = torch.logspace(-1, 1, m, dtype=torch.float64)[:, None]
    return scales * torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("m", [2, 3, 5])
def test_aligned_jacobian_has_condition_number_one(m):
    jac = _jac(m, 12, m)
    b = balance_matrix(jac @ jac.T)
    sv = torch.linalg.svdvals(b @ jac)
    smallest = torch.linalg.svdvals(jac).min()
    torch.testing.assert_close(sv, smallest.expand(m), rtol=1e-8, atol=0)


@pytest.mark.parametrize("m", [2, 4])
def test_matches_direct_svd_in_parameter_space(m):
    jac = _jac(m, 9, 10 + m)
    u, s, vh = torch.linalg.svd(jac, full_matrices=False)
    aligned = s.min() * u @ vh  # closest matrix with orthogonal rows of norm sigma_min (Procrustes)
    torch.testing.assert_close(AlignedMTL().aggregate(jac), aligned.sum(0), rtol=1e-5, atol=1e-6)
    pref = torch.arange(1, m + 1, dtype=torch.float64)
    got = AlignedMTL(pref_vector=pref.tolist()).aggregate(jac)
    torch.testing.assert_close(got, pref @ aligned, rtol=1e-5, atol=1e-6)


def test_rank_deficient_jacobian():
    jac = _jac(4, 6, 3)
    jac[3] = jac[0] + jac[1]  # rank 3
    gram = jac @ jac.T
    b = balance_matrix(gram, rank_tol=1e-10)
    eig = torch.linalg.eigvalsh(b @ gram @ b)
    nonzero = eig[eig > 1e-8 * eig.max()]
    assert nonzero.numel() == 3
    torch.testing.assert_close(nonzero, nonzero.mean().expand(3), rtol=1e-6, atol=0)
    assert torch.isfinite(AlignedMTL()(gram)).all()
