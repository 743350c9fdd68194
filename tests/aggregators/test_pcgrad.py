import copy

import pytest
import torch

from lightning_mtl.aggregators import PCGrad


def _reference_pcgrad(jac, orders):
    """Algorithm 1 of Yu et al. (2020) on the n-dimensional vectors, with the given orders."""
    projected = []
    for i in range(jac.shape[0]):
        g = jac[i].clone()
        for j in orders[i].tolist():
            inner = g @ jac[j]
            if inner < 0:
                g = g - inner / jac[j].square().sum() * jac[j]
        projected.append(g)
    return torch.stack(projected).sum(0)


@pytest.mark.parametrize("m", [2, 3, 5, 8])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_direct_implementation(m, seed):
    gen = torch.Generator().manual_seed(100 * m + seed)
    jac = torch.randn(m, 12, generator=gen, dtype=torch.float64)
    agg = PCGrad(seed=seed)
    for _ in range(3):  # several calls: the orders change between calls
        orders = copy.deepcopy(agg).sample_orders(m)  # the orders the next call will draw
        expected = _reference_pcgrad(jac, orders)
        torch.testing.assert_close(agg.aggregate(jac), expected, rtol=1e-5, atol=1e-6)


def test_two_conflicting_gradients():
    jac = torch.tensor([[1.0, 0.2, 0.0], [-0.8, 1.0, 0.3]], dtype=torch.float64)
    assert jac[0] @ jac[1] < 0
    d = PCGrad(seed=0).aggregate(jac)
    assert (jac @ d).min() >= -1e-6
    # each task's gradient lost exactly its component along the other one
    g1 = jac[0] - (jac[0] @ jac[1]) / jac[1].square().sum() * jac[1]
    g2 = jac[1] - (jac[1] @ jac[0]) / jac[0].square().sum() * jac[0]
    torch.testing.assert_close(d, g1 + g2, rtol=1e-6, atol=1e-7)


def test_non_conflicting_is_plain_sum_or_mean():
    gen = torch.Generator().manual_seed(3)
    jac = torch.rand(5, 10, generator=gen, dtype=torch.float64)  # all entries positive: no conflict
    torch.testing.assert_close(PCGrad(seed=1).aggregate(jac), jac.sum(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(PCGrad(reduction="mean", seed=1).aggregate(jac), jac.mean(0), rtol=1e-6, atol=1e-6)


def test_seed_reproducible_and_orders_valid():
    a, b = PCGrad(seed=7), PCGrad(seed=7)
    orders = a.sample_orders(6)
    assert orders.shape == (6, 5)
    for i, row in enumerate(orders.tolist()):
        assert sorted(row) == [j for j in range(6) if j != i]
    torch.testing.assert_close(orders, b.sample_orders(6))
    with pytest.raises(ValueError):
        PCGrad(reduction="max")
