"""Active source sampling via Lasso: relevance recovery on planted heads, exact budgets, the budget sampler,
the callback on synthetic features, and the digits benchmark's planted source (seeded)."""

from __future__ import annotations

from collections import Counter

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn

from lightning_mtl import ClassificationTask, MultiTaskModule
from lightning_mtl.selection import (
    ActiveSourceSelection,
    DigitsMLP,
    DigitsSources,
    SourceBudgetSampler,
    allocate_budgets,
    estimate_relevance,
    fit_linear_heads,
)
from tests.fixtures.trainers import one_thread, tiny_trainer  # noqa: F401


def _planted(k=30, m=12, support=(3, 7), seed=0):
    rng = np.random.default_rng(seed)
    heads = rng.normal(size=(k, m))
    nu = np.zeros(m)
    nu[list(support)] = [1.0, -0.6]
    return heads, nu, heads @ nu + 0.01 * rng.normal(size=k)


def test_lasso_recovers_a_planted_sparse_relevance():
    heads, nu, target = _planted()
    estimate = estimate_relevance(heads, target, "nu1", reg=0.01)
    assert set(np.flatnonzero(np.abs(estimate) > 1e-8)) == {3, 7}  # exactly the support
    assert np.sign(estimate[[3, 7]]).tolist() == [1.0, -1.0]
    budgets = allocate_budgets(estimate, 1000, "nu1")
    assert budgets.sum() == 1000 and budgets[[3, 7]].sum() == 1000
    # least squares (nu2 without penalty) has no zeros but recovers the values on noise-free heads
    exact = estimate_relevance(heads, heads @ nu, "nu2", reg=0.0)
    np.testing.assert_allclose(exact, nu, atol=1e-10)  # k > M, full column rank: the unique solution


def test_budgets_by_hand():
    nu = [3.0, -1.0, 0.0]
    assert allocate_budgets(nu, 8, "nu1").tolist() == [6, 2, 0]  # |nu| / 4 of 8
    assert allocate_budgets(nu, 8, "nu2").tolist() == [7, 1, 0]  # nu^2 / 10 of 8 = 7.2, 0.8, 0
    assert allocate_budgets(nu, 9, "uniform").tolist() == [3, 3, 3]
    assert allocate_budgets([0.0, 0.0], 5, "nu1").tolist() == [3, 2]  # no relevance: equal
    # explore 0.3: 0.7 * [0.75, 0.25, 0] + 0.1 = [0.625, 0.275, 0.1] of 40
    assert allocate_budgets(nu, 40, "nu1", explore=0.3).tolist() == [25, 11, 4]
    rng = np.random.default_rng(1)
    for _ in range(20):
        total = int(rng.integers(1, 5000))
        assert allocate_budgets(rng.normal(size=9), total, "nu2").sum() == total
    with pytest.raises(ValueError, match="strategy must be"):
        allocate_budgets(nu, 8, "nu3")  # type: ignore[arg-type]


def test_linear_heads_are_the_ridge_solution():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5))
    y = (x @ np.array([1.0, -2.0, 0.0, 0.5, 0.0]) > 0).astype(np.int64)
    head = fit_linear_heads(x, y, reg=0.0)
    centred = x - x.mean(0)
    expected = np.linalg.lstsq(centred, (2 * y - 1) - (2 * y - 1).mean(), rcond=None)[0]
    np.testing.assert_allclose(head, expected, atol=1e-8)


def test_budget_sampler_draws_exactly_the_budgets():
    sizes, budgets = [10, 50, 7], [25, 5, 0]
    sampler = SourceBudgetSampler(sizes, budgets, batch_size=4, seed=1)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        drawn = [i for b in sampler for i in b]
        per_source = Counter(int(np.searchsorted(np.cumsum(sizes), i, side="right")) for i in drawn)
        assert [per_source[m] for m in range(3)] == budgets
        first = [i for i in drawn if i < 10]
        assert (
            len(Counter(first)) == 10 and max(Counter(first).values()) == 3
        )  # 25 = 2.5 passes and min(Counter(first).values()) == 2
    assert len(sampler) == 8
    sampler.set_budgets([0, 30, 0])
    with pytest.raises(ValueError, match="sum to the total 30"):
        sampler.set_budgets([1, 1, 1])
    # budgets within the sizes: no sample drawn twice in an epoch
    ranks = [SourceBudgetSampler(sizes, [10, 20, 0], batch_size=3, rank=r, world_size=2) for r in range(2)]
    for a, b in zip(*ranks):  # 30 samples in global batches of 6: no padding, equal disjoint shares
        assert len(a) == len(b) == 3 and not set(a) & set(b)
    union = sorted(i for s in ranks for batch in s for i in batch)
    assert len(union) == 30 and Counter(union) == Counter(ranks[0].epoch_indices(0).tolist())


class _Features(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Identity()


def test_callback_recovers_the_planted_source_on_synthetic_heads():
    # sources: labels = sign(x . w_m) on shared features; the target's head is source 4's
    rng = np.random.default_rng(0)
    k, m, n = 16, 10, 400
    heads = rng.normal(size=(k, m))
    sources = {}
    for j in range(m):
        x = torch.as_tensor(rng.normal(size=(n, k)), dtype=torch.float32)
        sources[f"s{j}"] = (x, torch.as_tensor((x.numpy() @ heads[:, j] > 0).astype(np.int64)))
    x0 = torch.as_tensor(rng.normal(size=(200, k)), dtype=torch.float32)
    target = (x0, torch.as_tensor((x0.numpy() @ heads[:, 4] > 0).astype(np.int64)))
    for strategy in ("nu1", "nu2"):
        nu = ActiveSourceSelection(strategy=strategy).select(_Features(), sources, target)
        assert int(np.argmax(np.abs(nu))) == 4
    nu = ActiveSourceSelection(strategy="nu1").select(_Features(), sources, target)
    assert allocate_budgets(nu, 1000, "nu1")[4] > 800  # the Lasso puts > 80 % on the planted source
    # nu2 spreads more: its share of the planted source is below nu1's
    nu2 = ActiveSourceSelection(strategy="nu2").select(_Features(), sources, target)
    assert allocate_budgets(nu2, 1000, "nu2")[4] < allocate_budgets(nu, 1000, "nu1")[4]


def _digits_run(strategy: str, epochs: int = 5, seed: int = 0):
    pl.seed_everything(seed)
    dm = DigitsSources(total_budget=1000, seed=seed)
    encoder = DigitsMLP()
    model = MultiTaskModule(encoder, {name: ClassificationTask(2) for name in dm.source_names}, feature_dim=32,
                            optimizer=lambda p: torch.optim.Adam(p, lr=3e-3))  # fmt: skip
    callback = ActiveSourceSelection(strategy=strategy)  # type: ignore[arg-type]
    trainer = tiny_trainer(max_epochs=epochs, callbacks=[callback], num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    return dm, callback, trainer


def test_lasso_puts_most_of_the_budget_on_the_planted_digits_source():
    dm, callback, trainer = _digits_run("nu1")
    planted = dm.source_names.index("invert_3")
    assert callback.budgets is not None and callback.budgets.sum() == dm.total_budget == dm.budgets.sum()
    assert callback.budgets[planted] / dm.total_budget > 0.5
    assert trainer.callback_metrics["selection/budget/invert_3"] == callback.budgets[planted]
    # the data module samples by the new budgets and keeps them in its checkpoint state
    again = DigitsSources(total_budget=1000)
    again.load_state_dict(dm.state_dict())
    assert again.budgets.tolist() == callback.budgets.tolist()
    restored = ActiveSourceSelection()
    restored.load_state_dict(callback.state_dict())
    np.testing.assert_array_equal(restored.relevance, callback.relevance)


def test_bad_inputs_are_one_sentence():
    with pytest.raises(ValueError, match="source_heads must be"):
        estimate_relevance(np.ones((3, 2)), np.ones(4))
    with pytest.raises(ValueError, match="unknown corruption"):
        DigitsSources(corruptions=("identity", "smudge"))
    with pytest.raises(ValueError, match="target must be"):
        DigitsSources(target="invert")
    with pytest.raises(ValueError, match="summing to 1000"):
        DigitsSources().set_budgets([1] * 20)
    with pytest.raises(AttributeError, match="needs a data module with `relevance_data`"):
        ActiveSourceSelection().on_train_epoch_end(tiny_trainer(), _Features())


def test_bf16_mixed_fit_updates_budgets():
    # autocast is off at the epoch's end; the callback feeds float32 features to scikit-learn
    pl.seed_everything(0)
    dm = DigitsSources(total_budget=300, seed=0)
    model = MultiTaskModule(DigitsMLP(), {name: ClassificationTask(2) for name in dm.source_names})
    callback = ActiveSourceSelection()
    trainer = tiny_trainer(max_epochs=1, precision="bf16-mixed", callbacks=[callback], num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    assert callback.budgets is not None and int(callback.budgets.sum()) == 300
    assert dm.budgets.tolist() == callback.budgets.tolist()


def test_budget_sampler_skip_resumes_inside_the_epoch():
    sampler = SourceBudgetSampler([10, 50, 7], [25, 5, 3], batch_size=4, seed=1)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.skip(2, 3)
    assert list(sampler) == full[3:]
    assert list(sampler) == full  # once


class _Inputs(pl.Callback):
    def __init__(self) -> None:
        self.seen: list[tuple[int, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append((trainer.current_epoch, round(float(batch[0].sum()), 3)))


def test_fit_resumed_mid_epoch_continues_with_the_budgets_of_that_epoch(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(ckpt_path=None, seed=0):
        pl.seed_everything(seed)
        dm, inputs = DigitsSources(total_budget=200, batch_size=20), _Inputs()
        model = MultiTaskModule(DigitsMLP(), {name: ClassificationTask(2) for name in dm.source_names})
        saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1, filename="{step}")
        trainer = tiny_trainer(max_epochs=2, callbacks=[ActiveSourceSelection(), inputs, saver],
                               enable_checkpointing=True, num_sanity_val_steps=0)  # fmt: skip
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
        return inputs.seen, dm.budgets.tolist()

    full, budgets = run()
    assert len(full) == 20
    resumed, resumed_budgets = run(tmp_path / "step=12.ckpt", seed=5)  # epoch 1, after the first re-budgeting
    assert resumed == full[12:] and resumed_budgets == budgets


def test_nu1_and_nu2_are_the_minimum_l1_and_l2_combinations():
    # Wang et al. (2023, abstract): nu^1 is the L1-regularised relevance, nu^2 (Chen et al., 2022) the
    # L2-regularised one. With fewer head entries than sources (k=2, M=3) every nu = (1 - 1.6 t, t, t)
    # fits w_0 exactly; the L1 norm 1 + 0.4 t is least at t = 0, the L2 norm at t = 3.2 / 9.12.
    heads, target = np.array([[1.0, 0.8, 0.8], [0.0, 0.5, -0.5]]), np.array([1.0, 0.0])
    for reg in (0.01, 0.1, 0.5):
        # by hand (KKT at nu = (a, 0, 0)): (1/k)(1 - a) = reg * lam_max = reg / 2, so a = 1 - reg
        np.testing.assert_allclose(estimate_relevance(heads, target, "nu1", reg), [1 - reg, 0, 0], atol=1e-8)
    t = 3.2 / 9.12
    np.testing.assert_allclose(estimate_relevance(heads, target, "nu2", reg=0.0), [1 - 1.6 * t, t, t], atol=1e-12)
    # the sparse relevance selects one source; the L2 one spreads the budget over all three
    assert allocate_budgets(estimate_relevance(heads, target, "nu1"), 1000, "nu1").tolist() == [1000, 0, 0]
    assert allocate_budgets(estimate_relevance(heads, target, "nu2", 0.0), 1000, "nu2").tolist() == [438, 281, 281]


def test_nu1_budgets_minimise_the_variance_of_the_composed_head():
    # if source head m is estimated from n_m samples with error variance s / n_m, the target head
    # W nu has variance s * sum nu_m^2 / n_m. For a fixed total N, Cauchy-Schwarz gives the minimum
    # ||nu||_1^2 / N at n_m ∝ |nu_m| (the nu1 rule); n_m ∝ nu_m^2 gives (#nonzero) * ||nu||_2^2 / N.
    rng = np.random.default_rng(0)
    total = 100_000_000  # every non-zero budget > 1e5, so rounding moves each term by < 1e-5 relative
    for _ in range(10):
        nu = rng.choice([-1.0, 1.0], size=6) * rng.uniform(0.2, 2.0, size=6) * (rng.random(6) < 0.7)
        nu[0] = 2.5  # at least one non-zero entry, and |nu| not constant on the support
        support = nu != 0

        def variance(budgets, support=support, nu=nu):
            return float((nu[support] ** 2 / budgets[support]).sum())

        best = np.abs(nu).sum() ** 2 / total
        np.testing.assert_allclose(variance(allocate_budgets(nu, total, "nu1")), best, rtol=1e-4)
        squared = variance(allocate_budgets(nu, total, "nu2"))
        np.testing.assert_allclose(squared, support.sum() * (nu**2).sum() / total, rtol=1e-4)
        if np.ptp(np.abs(nu[support])) > 1e-3:
            assert squared > best * (1 + 1e-3)  # nu2 is strictly worse unless |nu| is flat on the support
        for shares in rng.dirichlet(np.ones(int(support.sum())), size=20):  # any other split of N
            other = np.zeros(6)
            other[support] = shares * total
            assert variance(other) >= best * (1 - 1e-9)
