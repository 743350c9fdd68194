"""FLOP counts (hand count, monotone in width), the budget / preference search, Kendall's tau and the
controllability metric, and the grid evaluation with its picture."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from lightning_mtl import ClassificationTask
from lightning_mtl.controllable import (
    BudgetSearch,
    ControllableMultiTaskModule,
    SlimmableDigitsCNN,
    configuration_flops,
    controllability,
    controllability_grid,
    count_flops,
    kendall_tau,
    plot_controllability,
    set_width,
)
from tests.fixtures.trainers import one_thread, tiny_multidigits  # noqa: F401  # one_thread: autouse


def _module(**kwargs):
    torch.manual_seed(0)
    defaults = dict(
        encoder=SlimmableDigitsCNN(channels=(4, 8), out_features=12),
        tasks={"left": ClassificationTask(10), "right": ClassificationTask(10)},
        decoder_hidden=16,
        decoder_widths=(0.25, 0.5, 1.0),
    )
    defaults.update(kwargs)
    return ControllableMultiTaskModule(**defaults)


def _hand_count_digits_cnn(c1, c2, out, grid=3, side=8, batch=1):
    """2 FLOPs per multiply-add of the four 3x3 convolutions and the projection (pooling, BN, ReLU: none)."""
    pixels, half = side * side, (side // 2) ** 2
    convs = 2 * 9 * (pixels * c1 * 1 + pixels * c1 * c1 + half * c2 * c1 + half * c2 * c2)
    return batch * (convs + 2 * c2 * grid * grid * out)


@pytest.mark.parametrize("width, dims", [(1.0, (4, 8, 12)), (0.5, (2, 4, 6)), (0.25, (1, 2, 3))])
def test_flops_equal_a_hand_count(width, dims):
    net = SlimmableDigitsCNN(channels=(4, 8), out_features=12)
    set_width(net, width)
    x = torch.randn(2, 1, 8, 8)
    assert count_flops(net, x) == _hand_count_digits_cnn(*dims, batch=2)


def test_configuration_flops_are_monotone_in_every_width():
    module = _module()
    x = torch.randn(1, 1, 10, 10)
    e_widths, d_widths = module.sampler.encoder_widths, module.sampler.decoder_widths
    table = {
        (e, dl, dr): configuration_flops(module, {"encoder": e, "left": dl, "right": dr}, x)
        for e, dl, dr in itertools.product(e_widths, d_widths, d_widths)
    }
    for (e, dl, dr), counts in table.items():
        assert counts["total"] == counts["encoder"] + counts["left"] + counts["right"]
        for i, widths in enumerate((e_widths, d_widths, d_widths)):
            key = [e, dl, dr]
            position = widths.index(key[i])
            if position + 1 < len(widths):
                key[i] = widths[position + 1]
                assert table[tuple(key)]["total"] > counts["total"]
    # the decoder of a task at hidden width h on d features: 2 * (d * h + h * 10)
    counts = table[(0.5, 0.25, 1.0)]
    assert counts["left"] == 2 * (6 * 4 + 4 * 10)
    assert counts["right"] == 2 * (6 * 16 + 16 * 10)
    assert module.configuration == module.sampler.widest()  # restored


def test_search_follows_preference_and_respects_the_budget():
    module = _module()
    search = BudgetSearch(module, torch.randn(1, 1, 10, 10))
    config = search.search(1.0, [0.8, 0.2])
    assert config == {"encoder": 1.0, "left": 1.0, "right": 0.25}
    assert search.search(1.0, [0.5, 0.5]) == search.search(1.0, {"left": 1, "right": 1}) == module.sampler.widest()
    assert search.search(1.0, [0.4, 0.6])["left"] == 0.5  # 0.4 / 0.6 = 0.67: the widest width at most that
    shares = [i / 10 for i in range(1, 10)]
    for budget in (0.1, 0.3, 0.6, 1.0):
        if budget * search.max_flops < search.min_flops:
            continue
        lefts = []
        for p in shares:
            chosen = search.search(budget, [p, 1 - p])
            assert search.flops(chosen) <= budget * search.max_flops
            lefts.append(chosen["left"])
        assert lefts == sorted(lefts)  # more preference never narrows the task's decoder
    encoders = [search.search(b, [0.5, 0.5])["encoder"] for b in (0.3, 0.6, 1.0)]
    assert encoders == sorted(encoders)


def test_search_errors_and_score():
    module = _module()
    search = BudgetSearch(module, torch.randn(1, 1, 10, 10), score=lambda config, shares: -config["encoder"])
    assert search.search(1.0, [0.5, 0.5])["encoder"] == module.sampler.encoder_widths[0]  # the score decides
    with pytest.raises(ValueError, match="below the narrowest"):
        search.search(search.min_flops / search.max_flops / 2, [0.5, 0.5])
    with pytest.raises(ValueError, match="unknown task"):
        search.search(1.0, {"middle": 1.0})
    with pytest.raises(ValueError, match="2 tasks"):
        search.search(1.0, [1.0])
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        search.search(1.5, [0.5, 0.5])


def test_kendall_tau_matches_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        x = torch.randint(0, 4, (9,), generator=generator).tolist()
        y = torch.randint(0, 4, (9,), generator=generator).tolist()
        expected = stats.kendalltau(x, y).statistic
        ours = kendall_tau(x, y)
        assert (math.isnan(ours) and math.isnan(expected)) or ours == pytest.approx(expected)
    assert kendall_tau([1, 2, 3], [10, 20, 30]) == 1.0
    assert kendall_tau([1, 2, 3], [3, 2, 1]) == -1.0
    assert math.isnan(kendall_tau([1, 1, 1], [1, 2, 3]))


def test_controllability_by_hand():
    preferences = [[0.9, 0.1], [0.5, 0.5], [0.1, 0.9]]
    assert controllability(preferences, [[0.9, 0.5], [0.8, 0.6], [0.7, 0.7]]) == 1.0
    assert controllability(preferences, [[0.7, 0.7], [0.8, 0.6], [0.9, 0.5]]) == -1.0
    # task a follows the preference, task b ignores it except one swap: (1 + 1/3) / 2
    assert controllability(preferences, [[0.9, 0.6], [0.8, 0.5], [0.7, 0.7]]) == pytest.approx((1 + 1 / 3) / 2)
    with pytest.raises(ValueError, match="varies"):
        controllability([[0.5, 0.5], [0.5, 0.5]], [[1, 2], [3, 4]])


def test_controllability_is_zero_where_the_performance_ignores_a_moving_preference():
    preferences = [[0.9, 0.1], [0.5, 0.5], [0.1, 0.9]]
    # every configuration ties (an untrained model): no agreement, no crash at the end of fit
    assert controllability(preferences, [[0.5, 0.5]] * 3) == 0.0
    # the first task follows its preference, the second ignores it: the mean of 1 and 0
    assert controllability(preferences, [[0.9, 0.6], [0.8, 0.6], [0.7, 0.6]]) == 0.5
    with pytest.raises(ValueError, match="at least one task whose preference varies"):
        controllability([[0.5, 0.5], [0.5, 0.5]], [[0.1, 0.2], [0.3, 0.4]])


def test_grid_evaluation_and_picture(tmp_path):
    module = _module()
    data = tiny_multidigits(num_val=32, batch_size=16)
    data.setup("fit")
    batches = list(data.val_dataloader())
    grid = controllability_grid(module, batches, [[0.8, 0.2], [0.5, 0.5], [0.2, 0.8]], [0.5, 1.0])
    assert len(grid["rows"]) == 6
    for row in grid["rows"]:
        assert row["flops"] <= row["budget"] * grid["max_flops"]
        assert all(0.0 <= v <= 1.0 for v in row["metrics"].values())
    assert -1.0 <= grid["mean_controllability"] <= 1.0
    pytest.importorskip("matplotlib")
    path = plot_controllability(grid, tmp_path / "c.png", module.task_names)
    assert path is not None and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
