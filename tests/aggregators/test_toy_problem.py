"""The CAGrad / Nash-MTL two-objective toy problem: its Pareto set, and methods that reach it.

Protocol: :data:`~lightning_mtl.aggregators.toy.QUICK_PROTOCOL` (150 Adam steps, learning rate
0.8 decayed to 1e-3, betas (0.5, 0.9)), **not** the papers' (lr 1e-3, 35,000-100,000 steps),
which would take hours on a CPU for five methods. The start points of the official CAGrad and
Nash-MTL scripts (six in all) run as one batch of independent problems. A run "ends on the Pareto set"
when every final point is within ``TOL`` of it; the methods end within 0.002, and the controls (a
sign error, a transposed Jacobian, the same runs stopped a third of the way) fail the same check
by a margin of 5x or more. Gradient descent on one task alone is *not* a control: it converges
to that task's minimum, an end point of the Pareto set.

UPGrad costs about 30 ms per call on a 2 x 2 problem on this CPU (its barrier solver needs many
Newton steps when the two gradients are nearly opposite), too slow for 900 calls here: the fast
test checks that its direction is exactly half PCGrad's for two tasks (so that Adam follows the
same path); the full run, and the Nash-MTL variant (``scale = 0.1``) of the problem, are
``long``-marked (run them with ``pytest -m long``).
"""

from __future__ import annotations

import pytest
import torch

from lightning_mtl.aggregators import create_aggregator, toy
from lightning_mtl.aggregators.base import GramianWeighting, JacobianAggregator
from tests.fixtures.trainers import one_thread  # noqa: F401 (autouse fixture)

TOL = 0.05
STARTS = torch.tensor(toy.ALL_START_POINTS, dtype=torch.float64)  # CAGrad's 3 and Nash-MTL's 5
METHODS = {"mgda": {}, "pcgrad": {"seed": 0}, "cagrad": {"c": 0.5}, "nashmtl": {}}  # c = 0.5: CAGrad's toy


def ends_on_pareto_set(trajectory: torch.Tensor, tol: float = TOL) -> bool:
    return bool((toy.distance_to_pareto_set(trajectory[-1]) < tol).all())


@pytest.fixture(scope="module")
def runs():
    """``runs(name, scale, starts)``: the trajectory ``[151, B, 2]``, computed once per module."""
    cache: dict[tuple, torch.Tensor] = {}

    def get(name: str, scale: float = 1.0, starts: tuple = toy.ALL_START_POINTS) -> torch.Tensor:
        key = (name, scale, starts)
        if key not in cache:
            agg = create_aggregator(name, **METHODS[name])
            cache[key] = toy.optimize(agg, torch.tensor(starts, dtype=torch.float64), scale=scale, **toy.QUICK_PROTOCOL)
        return cache[key]

    return get


# --- the problem itself ---------------------------------------------------------------------


def test_losses_are_the_official_formulas():
    """Same values as the expressions of the official ``Toy.batch_forward`` (rewritten here)."""
    gen = torch.Generator().manual_seed(0)
    x = 8 * torch.randn(500, 2, generator=gen, dtype=torch.float64)
    x1, x2 = x[:, 0], x[:, 1]
    f1 = torch.clamp((0.5 * (-x1 - 7) - torch.tanh(-x2)).abs(), 5e-6).log() + 6
    f2 = torch.clamp((0.5 * (-x1 + 3) + torch.tanh(-x2) + 2).abs(), 5e-6).log() + 6
    up, down = torch.clamp(torch.tanh(x2 * 0.5), 0), torch.clamp(torch.tanh(-x2 * 0.5), 0)
    sq1 = ((-x1 + 7).pow(2) + 0.1 * (-x2 - 8).pow(2)) / 10 - 20
    sq2 = ((-x1 - 7).pow(2) + 0.1 * (-x2 - 8).pow(2)) / 10 - 20
    expected = torch.stack([f1 * up + sq1 * down, f2 * up + sq2 * down], -1)
    torch.testing.assert_close(toy.losses(x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(toy.losses(x, scale=0.1), expected * torch.tensor([0.1, 1.0], dtype=x.dtype))
    assert (toy.losses(x) > torch.tensor(toy.loss_lower_bounds())).all()
    # the origin is not a dead point: the gradients pass through the clamps at x2 = 0 (old clamp)
    origin = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.grad(toy.losses(origin).sum(), origin)[0].norm() > 1


def test_pareto_set_is_pareto_stationary_and_matches_the_papers_figure():
    curve = toy.pareto_set(41).requires_grad_(True)
    values = toy.losses(curve)
    g1 = torch.autograd.grad(values[:, 0].sum(), curve, retain_graph=True)[0]
    g2 = torch.autograd.grad(values[:, 1].sum(), curve)[0]
    inner = curve[1:-1].detach()
    cos = (g1 * g2).sum(-1) / (g1.norm(dim=-1) * g2.norm(dim=-1))
    assert (cos[1:-1] < -1 + 1e-9).all(), inner  # interior: anti-parallel gradients
    assert g1[-1].norm() < 1e-9 and g2[0].norm() < 1e-9  # ends: the single-task minima
    # the papers draw the set at x2 = -8.3552 (the minimiser of L1 + L2, at x1 = 0)
    assert abs(toy.pareto_x2(0.0).item() + 8.3552) < 1e-4
    assert abs(toy.pareto_x2(7.0).item() + 8.4345) < 1e-4
    # the front is monotone: L1 falls and L2 rises along the curve
    front = toy.pareto_front(201, scale=0.1)
    assert (front[1:, 0] < front[:-1, 0]).all() and (front[1:, 1] > front[:-1, 1]).all()


def test_no_grid_point_dominates_the_curve():
    """Every point of a grid over [-10, 10] x [-12, 10] is dominated by a point of the curve."""
    xs = torch.linspace(-10, 10, 401, dtype=torch.float64)
    ys = torch.linspace(-12, 10, 441, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="ij"), -1).reshape(-1, 2)
    values = toy.losses(grid)
    front = toy.pareto_front(20_001)  # L1 decreasing, L2 increasing along it
    first = torch.searchsorted(-front[:, 0].contiguous(), -values[:, 0].contiguous())  # first with L1 <= L1(p)
    best_l2 = front[first.clamp(max=front.shape[0] - 1), 1]
    best_l2 = torch.where(first < front.shape[0], best_l2, torch.full_like(best_l2, float("inf")))
    # slack: the curve is sampled every 7e-4 in x1, where |dL/dx1| <= 2.8
    assert (best_l2 <= values[:, 1] + 2e-3).all()


def test_distance_to_pareto_set():
    curve = toy.pareto_set(7)
    assert toy.distance_to_pareto_set(curve).max() < 1e-4
    shifted = curve + torch.tensor([0.0, 0.5], dtype=torch.float64)
    torch.testing.assert_close(toy.distance_to_pareto_set(shifted[3:4]), torch.tensor([0.5], dtype=torch.float64))
    far = torch.tensor([[10.0, -8.4345]], dtype=torch.float64)  # beyond the end point (7, -8.4345)
    expected = torch.tensor([3.0], dtype=torch.float64)
    torch.testing.assert_close(toy.distance_to_pareto_set(far), expected, atol=1e-4, rtol=0)


# --- the optimiser --------------------------------------------------------------------------


def test_batched_run_equals_separate_runs():
    agg = create_aggregator("nashmtl")  # stateful: warm start from the previous weights
    batch = toy.optimize(agg, STARTS[:3], 10, lr=0.1)
    for i in range(3):
        torch.testing.assert_close(toy.optimize(agg, STARTS[i], 10, lr=0.1), batch[:, i])
    assert batch.shape == (11, 3, 2) and agg.step_count == 0  # the caller's instance is untouched


def test_loss_weighting_follows_the_gradient_of_the_mean_loss():
    """``ls`` follows grad(L1 + L2): it ends at the minimiser of the mean loss, (0, y(0))."""
    trajectory = toy.optimize(create_aggregator("ls"), STARTS, **toy.QUICK_PROTOCOL)
    target = torch.tensor([0.0, toy.pareto_x2(0.0).item()], dtype=torch.float64)
    assert (trajectory[-1] - target).norm(dim=-1).max() < 1e-2


# --- the methods ------------------------------------------------------------------------------


# Fast suite: MGDA and PCGrad from all six start points, CAGrad and Nash-MTL from those of their
# own paper's toy script (3 and 5; their solvers cost about 10 ms per call on these nearly opposite
# gradients); the slow suite runs all four from all six, on both variants of the problem.
FAST_STARTS = {
    "mgda": toy.ALL_START_POINTS,
    "pcgrad": toy.ALL_START_POINTS,
    "cagrad": toy.START_POINTS["cagrad"],
    "nashmtl": toy.START_POINTS["nashmtl"],
}


def _check(trajectory: torch.Tensor, name: str) -> None:
    distances = toy.distance_to_pareto_set(trajectory[-1])
    assert ends_on_pareto_set(trajectory), f"{name}: final distances {distances.tolist()}"
    # control: the same run stopped a third of the way is not there yet
    assert not ends_on_pareto_set(trajectory[:51]), f"{name} converged too early for the check to mean much"


@pytest.mark.parametrize("name", list(METHODS))
def test_method_ends_on_the_pareto_set(runs, name):
    _check(runs(name, 1.0, FAST_STARTS[name]), name)


@pytest.mark.long
@pytest.mark.parametrize("scale", [1.0, toy.NASH_MTL_SCALE], ids=["cagrad_toy", "nashmtl_toy"])
@pytest.mark.parametrize("name", list(METHODS))
def test_method_ends_on_the_pareto_set_from_every_start_point(runs, name, scale):
    _check(runs(name, scale), name)


def test_upgrad_is_pcgrad_for_two_tasks(runs):
    """With two tasks UPGrad's direction is PCGrad's halved, so Adam follows the same path.

    Both project a conflicting gradient onto the normal plane of the other (UPGrad's projection
    onto the dual cone reduces to that), then UPGrad averages and PCGrad sums. Adam is invariant
    to a constant positive factor on the gradients (up to its ``eps``), so UPGrad's trajectories
    are PCGrad's; running them costs about 30 ms per call on this CPU, see the slow test below.
    """
    upgrad, pcgrad = create_aggregator("upgrad"), create_aggregator("pcgrad", seed=0)
    points = runs("pcgrad")[::25].reshape(-1, 2).clone().requires_grad_(True)  # 42 points
    values = toy.losses(points)
    rows = [torch.autograd.grad(values[:, i].sum(), points, retain_graph=True)[0] for i in range(2)]
    jacobians = torch.stack(rows, dim=1)
    conflicts = 0
    for jac in jacobians:
        conflicts += int(jac[0] @ jac[1] < 0)
        # float32 weights: agreement to ~1e-7 of |J| (the direction itself is tiny near the set)
        torch.testing.assert_close(upgrad.aggregate(jac), 0.5 * pcgrad.aggregate(jac), rtol=0, atol=1e-6 * jac.norm())
    assert conflicts > 10  # the comparison covers the projections, not only the plain mean


@pytest.mark.long
def test_upgrad_ends_on_the_pareto_set():
    trajectory = toy.optimize(create_aggregator("upgrad"), STARTS, **toy.QUICK_PROTOCOL)
    assert ends_on_pareto_set(trajectory), toy.distance_to_pareto_set(trajectory[-1]).tolist()


class _SignError(GramianWeighting):
    """Ascends on task 2: ``d = g1 - g2``."""

    def forward(self, gramian: torch.Tensor) -> torch.Tensor:
        return torch.tensor([1.0, -1.0])


class _Transposed(JacobianAggregator):
    """The mean of the rows of ``J^T`` instead of ``J`` (a shape-compatible bug when m = n = 2)."""

    def forward(self, jacobian: torch.Tensor) -> torch.Tensor:
        return 0.5 * jacobian.sum(1)


class _TaskOneOnly(GramianWeighting):
    def forward(self, gramian: torch.Tensor) -> torch.Tensor:
        return torch.tensor([1.0, 0.0])


@pytest.mark.parametrize("broken", [_SignError, _Transposed], ids=["sign_error", "transposed_jacobian"])
def test_broken_directions_fail_the_check(broken):
    trajectory = toy.optimize(broken(), STARTS, **toy.QUICK_PROTOCOL)
    assert not ends_on_pareto_set(trajectory)
    assert toy.distance_to_pareto_set(trajectory[-1]).max() > 5 * TOL


def test_single_task_descent_reaches_an_end_point_of_the_set():
    """Not a control: the minimiser of one task is Pareto optimal (the end point (7, y(7)))."""
    trajectory = toy.optimize(_TaskOneOnly(), STARTS, **toy.QUICK_PROTOCOL)
    end = torch.tensor([7.0, toy.pareto_x2(7.0).item()], dtype=torch.float64)
    assert (trajectory[-1] - end).norm(dim=-1).max() < TOL
