import copy

import pytest
import torch

from lightning_mtl.aggregators import NashMTL


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
    gn = gram / torch.linalg.matrix_norm(gram)
    assert (alpha > 0).all()
    torch.testing.assert_close(gn @ alpha, 1 / alpha, rtol=1e-5, atol=0)


def test_scale_invariance_and_warm_start():
    gram = _gram(4, 10, 0)
    agg = NashMTL()
    first = agg(gram)
    torch.testing.assert_close(agg(1e4 * gram), first, rtol=1e-5, atol=0)  # the Gramian is normalised
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
    sub = sub / torch.linalg.matrix_norm(gram)
    torch.testing.assert_close(sub @ alpha[[0, 2]], 1 / alpha[[0, 2]], rtol=1e-5, atol=0)
