"""The SAM example script runs as shipped; the rho schedule's values."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

from lightning_mtl.sharpness import RhoSchedule, SharpnessAwareMinimization

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_sam_callback_example_runs():
    spec = importlib.util.spec_from_file_location("sam_callback_example", ROOT / "examples" / "sam_callback.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    trainer = example.main(["--epochs", "2", "--limit-train-batches", "6", "--adaptive"])
    sam = next(c for c in trainer.callbacks if isinstance(c, SharpnessAwareMinimization))
    assert sam.steps == trainer.global_step == 12 and sam.adaptive and sam.last_rho == 0.5
    assert float(trainer.callback_metrics["val/acc"]) > 0.5  # ten classes: chance is 0.1


def test_rho_schedule_values():
    linear = RhoSchedule(start=0.1, end=0.3, steps=4, kind="linear")
    assert [linear(s) for s in (0, 2, 4, 10)] == pytest.approx([0.1, 0.2, 0.3, 0.3])
    cosine = RhoSchedule(start=0.0, end=1.0, steps=2, kind="cosine")
    assert [cosine(s) for s in (0, 1, 2)] == pytest.approx([0.0, 0.5, 1.0])
    warm = RhoSchedule(start=0.05, warmup_steps=4)
    assert [warm(s) for s in (0, 3, 4, 100)] == pytest.approx([0.01, 0.04, 0.05, 0.05])
    with pytest.raises(ValueError, match="end"):
        RhoSchedule(start=0.1, kind="linear")
    with pytest.raises(ValueError, match="kind"):
        RhoSchedule(start=0.1, kind="exp")
    assert math.isclose(RhoSchedule(0.2)(7), 0.2)
