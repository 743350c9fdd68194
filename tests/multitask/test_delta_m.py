import pytest

from lightning_mtl.multitask import delta_m


def test_delta_m_hand_computed():
    # task a: acc 0.9 vs 0.8 (higher better) -> -12.5 %; task b: mae 1.1 vs 1.0 (lower better) -> +10 %,
    # mse 0.5 vs 1.0 -> -50 % ; task b mean = -20 %; overall (-12.5 - 20) / 2 = -16.25
    metrics = {"a": {"acc": 0.9}, "b": {"mae": 1.1, "mse": 0.5}}
    baselines = {"a": {"acc": 0.8}, "b": {"mae": 1.0, "mse": 1.0}}
    higher = {"a": {"acc": True}, "b": {"mae": False, "mse": False}}
    assert delta_m(metrics, baselines, higher) == pytest.approx(-16.25)


def test_delta_m_zero_when_equal_to_baselines():
    assert delta_m({"a": {"acc": 0.7}}, {"a": {"acc": 0.7}}, {"a": {"acc": True}}) == 0.0


def test_delta_m_needs_a_baseline():
    with pytest.raises(ValueError):
        delta_m({}, {}, {})
