import itertools

import pytest
import torch

from lightning_mtl.aggregators import DualProj, UPGrad, create_aggregator
from tests.fixtures.jacobians import badly_scaled_jacobians


def _jac(m, n, seed):
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _project_by_active_sets(y, jac):
    """argmin_x |x - y| s.t. J x >= 0, exactly in float64: the projection is the projection of ``y``
    onto the subspace {g_i . x = 0, i in A} for its active set A, so it is the nearest feasible one
    of these 2^m candidates (J has full row rank here)."""
    best = None
    for k in range(jac.shape[0] + 1):
        for active in itertools.combinations(range(jac.shape[0]), k):
            a = jac[list(active)]
            x = y - a.T @ torch.linalg.solve(a @ a.T, a @ y) if k else y.clone()
            if (jac @ x >= -1e-12 * jac.norm(dim=1) * x.norm()).all():
                if best is None or (x - y).norm() < (best - y).norm():
                    best = x
    return best


@pytest.mark.parametrize("m,n,seed", [(2, 4, 0), (3, 5, 1), (3, 8, 2), (4, 6, 3), (5, 9, 4)])
def test_is_the_projection_of_the_mean_onto_the_dual_cone(m, n, seed):
    jac = _jac(m, n, seed)
    jac[1] = -0.8 * jac[0] + 0.3 * jac[1]  # a strong conflict, so the mean is infeasible
    expected = _project_by_active_sets(jac.mean(0), jac)
    w = DualProj()(jac @ jac.T).double()
    scale = float(w.abs() @ jac.norm(dim=1))  # float32 weights: d is known to this relative accuracy
    torch.testing.assert_close(w @ jac, expected, rtol=0, atol=1e-6 * scale)
    pref = torch.linspace(1.0, 2.0, m, dtype=torch.float64)
    expected = _project_by_active_sets(pref @ jac, jac)
    w = DualProj(pref_vector=pref.tolist())(jac @ jac.T).double()
    torch.testing.assert_close(w @ jac, expected, rtol=0, atol=1e-6 * float(w.abs() @ jac.norm(dim=1)))


@pytest.mark.parametrize("m,seed", [(2, 4), (3, 5), (5, 6), (8, 7)])
def test_result_conflicts_with_no_task(m, seed):
    jac = _jac(m, 10, seed)
    jac[1] = -0.8 * jac[0] + 0.1 * jac[1]
    w = DualProj()(jac @ jac.T).double()
    d = w @ jac
    assert (jac @ d >= -1e-6 * jac.norm(dim=1) * float(w.abs() @ jac.norm(dim=1))).all()
    assert (jac.mean(0) - d).norm() <= (jac.mean(0) - UPGrad().aggregate(jac)).norm() + 1e-6  # the closest


@pytest.mark.parametrize("family", ["spread", "tiny", "conflicting"])
@pytest.mark.parametrize("m", [2, 3, 5])
def test_no_conflict_with_badly_scaled_gradients(family, m):
    for seed in range(4):
        jac = badly_scaled_jacobians(m, seed)[family].double()
        w = DualProj()(jac @ jac.T).double()
        norms = jac.norm(dim=1)
        slack = jac @ (w @ jac) / (norms * (w.abs() @ norms))
        assert slack.min() >= -1e-6, (seed, slack)


def test_non_conflicting_mean_is_kept_and_arguments():
    jac = torch.rand(4, 10, generator=torch.Generator().manual_seed(8), dtype=torch.float64)  # no conflict
    torch.testing.assert_close(DualProj().aggregate(jac), jac.mean(0), rtol=1e-5, atol=1e-6)
    pref = [0.1, 0.2, 0.3, 0.4]
    torch.testing.assert_close(DualProj(pref_vector=pref)(jac @ jac.T), torch.tensor(pref), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="non-negative"):
        DualProj(pref_vector=[1.0, -1.0])
    with pytest.raises(ValueError, match="2 preference weights but there are 4 tasks"):
        DualProj(pref_vector=[1.0, 1.0])(jac @ jac.T)
    assert type(create_aggregator("dual_proj")) is DualProj


def test_opposite_gradients_give_zero():
    jac = torch.tensor([[1.0, 2.0, 0.0], [-1.0, -2.0, 0.0]])
    assert DualProj().aggregate(jac).abs().max() < 1e-6
