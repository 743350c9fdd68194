"""Shared harness: every registered aggregator, whatever its kind, must pass these checks.

A method registered with ``@register_aggregator`` is tested here the moment it is imported by
``lightning_mtl.aggregators``.
"""

from __future__ import annotations

import copy
import io
from pathlib import Path

import pytest
import torch

from lightning_mtl.aggregators import create_aggregator, get_aggregator_class, list_aggregators
from lightning_mtl.aggregators.base import Aggregator
from tests.fixtures.jacobians import badly_scaled_jacobians

NAMES = list_aggregators()
GRAMIAN_NAMES = [name for name in NAMES if get_aggregator_class(name).kind == "gramian"]
N = 20

# Every method file of the gradient-aggregation family must be registered.
EXPECTED = {
    "aligned_mtl": "alignedmtl",
    "cagrad": None,
    "db_mtl": "dbmtl",
    "dualproj": None,
    "fairgrad": None,
    "graddrop": None,
    "gradvac": None,
    "imtl_g": "imtl",
    "mgda": None,
    "nashmtl": "nash_mtl",
    "pcgrad": None,
    "upgrad": None,
}


# ... and every loss weighting.
EXPECTED_LOSS_WEIGHTINGS = {"ls": "ew", "si_ls": "log_ls", "uw": "uncertainty", "dwa": None, "rlw": "random",
                            "gradnorm": None, "famo": None}  # fmt: skip


def test_expected_loss_weightings_are_registered():
    for name, alias in EXPECTED_LOSS_WEIGHTINGS.items():
        cls = get_aggregator_class(name)
        assert cls.kind == "loss", name
        if alias is not None:
            assert get_aggregator_class(alias) is cls


def test_every_method_has_a_method_config():
    configs = Path(__file__).resolve().parents[2] / "configs" / "methods"
    missing = [name for name in list_aggregators() if not (configs / f"{name}.yaml").is_file()]
    assert not missing, f"no configs/methods/<name>.yaml for {missing}"


def _jacobian(m: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(m, N, generator=gen, dtype=torch.float64).to(dtype)


def _bind(agg: Aggregator, m: int) -> Aggregator:
    """Size the method's per-task state for m tasks, as MultiTaskModule does at construction."""
    if getattr(agg, "_bound_tasks", None) != m:
        agg.bind_tasks(tuple(f"task{i}" for i in range(m)))
        agg._bound_tasks = m
    return agg


def _call(agg: Aggregator, jac: torch.Tensor) -> torch.Tensor:
    """The method's raw output for a Jacobian: weights, direction, or scalar objective."""
    _bind(agg, jac.shape[0])
    if agg.kind == "gramian":
        return agg(jac @ jac.T)
    if agg.kind == "jacobian":
        return agg(jac)
    losses = jac.square().mean(1) + 0.1  # positive "losses", one per task
    if getattr(agg, "needs_grad_norms", False):
        return agg(losses, grad_norms=jac.norm(dim=1))
    return agg(losses)


def test_expected_methods_are_registered():
    for name, alias in EXPECTED.items():
        assert name in NAMES
        if alias is not None:
            assert get_aggregator_class(alias) is get_aggregator_class(name)


def test_a_parsers_help_lists_the_names_its_aggregator_argument_takes():
    """Wherever an argument takes an aggregator, its help lists the registered names that fit its type."""
    from jsonargparse import ArgumentParser

    from lightning_mtl.aggregators import AggregatorName, LossWeighting, PCGrad
    from lightning_mtl.aggregators.registry import describe_names

    def listed(typehint: object) -> dict[str, str]:
        parser = ArgumentParser(prog="demo")
        parser.add_argument("--agg", type=typehint)
        text = " ".join(parser.format_help().split())
        if "registered names: " not in text:
            return {}
        entries = text.split("registered names: ")[1].split(")")[0].split(", ")
        return {name: entry.split(" -> ")[1] for entry in entries for name in entry.split(" -> ")[0].split("/")}

    everything = listed(AggregatorName)
    assert set(NAMES) <= set(everything) and everything["ew"] == "LinearScalarization"
    assert listed(PCGrad | None) == {"pcgrad": "PCGrad"}
    losses = listed(LossWeighting)
    assert set(losses) >= {name for name in NAMES if get_aggregator_class(name).kind == "loss"}
    assert all(get_aggregator_class(name).kind == "loss" for name in losses)
    assert listed(int) == {}  # other arguments keep their help as it was
    assert describe_names((PCGrad,)) == "pcgrad -> PCGrad"


@pytest.mark.parametrize("name", NAMES)
def test_builds_with_default_arguments(name):
    """Every registered aggregator can be built from its name alone (configs may omit arguments)."""
    try:
        agg = create_aggregator(name)
    except TypeError as err:
        pytest.fail(f"{name} cannot be built with default arguments: {err}")
    assert agg.kind in ("loss", "gramian", "jacobian")


def test_gramian_weightings_are_found():
    """The Gramian-only test below is parametrized over these names; none may be missed."""
    jacobian_methods = {"db_mtl", "graddrop"}
    assert set(EXPECTED) - jacobian_methods <= set(GRAMIAN_NAMES)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("m", [1, 2, 5])
def test_shape_dtype_and_finite(name, m):
    agg = create_aggregator(name)
    jac = _jacobian(m, seed=m)
    if agg.kind == "gramian":
        for g in (jac @ jac.T, (jac @ jac.T).double(), (jac @ jac.T).bfloat16()):
            w = copy.deepcopy(agg)(g)
            assert w.shape == (m,)
            assert w.dtype == torch.float32
            assert torch.isfinite(w).all()
        d = agg.aggregate(jac)
        assert d.shape == (N,) and d.dtype == jac.dtype and torch.isfinite(d).all()
    elif agg.kind == "jacobian":
        for j in (jac, jac.double(), jac.bfloat16()):
            d = copy.deepcopy(agg)(j)
            assert d.shape == (N,)
            assert d.dtype == j.dtype
            assert torch.isfinite(d.float()).all()
    else:
        out = _call(agg, jac)
        assert out.dim() == 0 and torch.isfinite(out)


@pytest.mark.parametrize("name", GRAMIAN_NAMES)
@pytest.mark.parametrize("m", [2, 5])
def test_gramian_methods_only_need_the_gramian(name, m):
    """``aggregate(J)`` is ``J^T forward(J J^T)``: nothing but the Gramian is used."""
    agg = create_aggregator(name)
    assert agg.kind == "gramian"
    jac = _jacobian(m, seed=10 + m, dtype=torch.float64)
    twin = copy.deepcopy(agg)  # same state (random generators, EMAs) for both calls
    direction = agg.aggregate(jac)
    weights = twin(jac @ jac.T)
    torch.testing.assert_close(direction, weights.double() @ jac, rtol=1e-6, atol=1e-9)
    # A rotation of the parameter space changes J but not G: the weights must not change.
    q, _ = torch.linalg.qr(torch.randn(N, N, dtype=torch.float64, generator=torch.Generator().manual_seed(3)))
    rotated = jac @ q
    twin2 = copy.deepcopy(twin)
    torch.testing.assert_close(copy.deepcopy(twin)(jac @ jac.T), twin2(rotated @ rotated.T), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("m", [1, 2, 5])
def test_zero_jacobian_gives_no_nan(name, m):
    agg = create_aggregator(name)
    jac = torch.zeros(m, N)
    out = _call(agg, jac)
    assert torch.isfinite(out).all()
    if agg.kind == "gramian":
        assert torch.isfinite(agg.aggregate(jac)).all()
        assert torch.count_nonzero(agg.aggregate(jac)) == 0
    elif agg.kind == "jacobian":
        assert torch.count_nonzero(out) == 0
    # a zero row among non-zero ones
    if m > 1:
        jac = _jacobian(m, seed=7)
        jac[0] = 0
        assert torch.isfinite(_call(create_aggregator(name), jac)).all()


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip(name):
    """After ``state_dict`` -> ``torch.save`` -> ``torch.load`` -> ``load_state_dict`` into a fresh
    instance, the next output is identical to the original's (random generators, EMAs, warm
    starts and step counters are all saved)."""
    m = 4
    agg = create_aggregator(name)
    for step in range(3):
        torch.manual_seed(step)
        _call(agg, _jacobian(m, seed=100 + step))
    buffer = io.BytesIO()
    torch.save(agg.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = _bind(create_aggregator(name), m)
    fresh.load_state_dict(state)
    for step in range(2):
        jac = _jacobian(m, seed=200 + step)
        torch.manual_seed(1000 + step)
        expected = _call(agg, jac)
        torch.manual_seed(1000 + step)
        got = _call(fresh, jac)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


# Float32 tolerance of the promises below, relative to the scale of the terms they compare:
# |g_i| * sum_j |w_j| |g_j| bounds both g_i . d and its round-off, whatever the task's own scale.
PROMISE_TOL = 1e-4


def _non_conflict(jac, w):
    """UPGrad, DualProj (Quinton & Rey, 2024), PCGrad with two tasks: ``g_i . d >= 0``."""
    scale = jac.norm(dim=1) * (w.abs() @ jac.norm(dim=1))
    slack = jac @ (w @ jac)
    assert (slack >= -PROMISE_TOL * scale).all(), (slack / scale).tolist()


def _min_norm_kkt(jac, w):
    """MGDA (Sener & Koltun, 2018): ``w`` on the simplex and ``g_i . d >= |d|^2`` for every task,
    the optimality condition of the min-norm point of the convex hull."""
    assert (w >= 0).all() and abs(float(w.sum()) - 1) < 1e-5
    d = w @ jac
    scale = jac.norm(dim=1) * (w.abs() @ jac.norm(dim=1))
    slack = jac @ d - d @ d
    assert (slack >= -PROMISE_TOL * scale).all(), (slack / scale).tolist()


def _bargaining(jac, w):
    """Nash-MTL (Navon et al., 2022) and FairGrad with alpha = 1: ``w_i (G w)_i = 1``, ``w > 0``."""
    assert (w > 0).all()
    scale = w * jac.norm(dim=1) * (w.abs() @ jac.norm(dim=1))
    residual = w * (jac @ (w @ jac)) - 1
    assert (residual.abs() <= PROMISE_TOL * scale).all(), (residual / scale).tolist()


def _equal_projections(jac, w):
    """IMTL-G (Liu et al., 2021): ``sum(w) = 1`` and ``d . g_i / |g_i|`` is the same for every task."""
    assert abs(float(w.sum()) - 1) < 1e-5
    proj = jac @ (w @ jac) / jac.norm(dim=1)
    scale = w.abs() @ jac.norm(dim=1)
    assert ((proj - proj.mean()).abs() <= PROMISE_TOL * scale).all(), proj.tolist()


PROMISES = {
    "upgrad": _non_conflict,
    "dualproj": _non_conflict,
    "mgda": _min_norm_kkt,
    "nashmtl": _bargaining,
    "fairgrad": _bargaining,
    "imtl_g": _equal_projections,
}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("family", ["spread", "tiny", "conflicting"])
def test_badly_scaled_jacobians_keep_each_promise(name, family):
    """Row norms spread over 1e-3..1e3, one task 1e4..1e7 times smaller than the others, strong
    conflicts (float32, as in training): every method returns a finite output of the right shape,
    and a Gramian weighting keeps the guarantee its paper makes (:data:`PROMISES`)."""
    for m in (2, 3, 5):
        for seed in range(3):
            jac = badly_scaled_jacobians(m, seed)[family]
            agg = create_aggregator(name)
            torch.manual_seed(seed)
            out = _call(agg, jac)
            assert torch.isfinite(out).all(), (m, seed)
            if agg.kind == "gramian":
                assert out.shape == (m,) and out.dtype == torch.float32
                promise = PROMISES.get(name)
                if name == "pcgrad" and m == 2:  # each projected gradient is orthogonal to the other task
                    promise = _non_conflict
                if promise is not None:
                    try:
                        promise(jac.double(), out.double())
                    except AssertionError as err:
                        raise AssertionError(f"{name} on {family}, m={m}, seed={seed}: {err}") from None
            elif agg.kind == "jacobian":
                assert out.shape == (N,)
            else:
                assert out.dim() == 0
