"""The controllable recipes through the real command line, and the evaluation callback's files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_mtl.cli import main
from lightning_mtl.controllable import ControllabilityEvaluation
from tests.controllable.test_search import _module
from tests.fixtures.trainers import one_thread, tiny_multidigits, tiny_trainer  # noqa: F401  # one_thread: autouse

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "controllable"
METHODS = sorted(p.stem for p in (CONFIGS / "methods").glob("*.yaml"))
FAST = ["--trainer.fast_dev_run=true", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--data.init_args.num_train=64", "--data.init_args.num_val=32", "--data.init_args.num_test=32"]  # fmt: skip


@pytest.mark.parametrize("method", METHODS)
def test_every_controllable_recipe_runs_through_the_cli(method):
    args = ["--config", str(CONFIGS / "data/multidigits.yaml"), "--config", str(CONFIGS / f"methods/{method}.yaml")]
    cli = main(["fit", *args, *FAST])
    assert cli.trainer.state.finished
    assert cli.trainer.global_step == 1
    assert cli.model.kd_weight == (0.0 if method == "no_kd" else 1.0)


def test_evaluation_callback_writes_the_table_and_the_picture(tmp_path):
    callback = ControllabilityEvaluation(
        preferences=[[0.8, 0.2], [0.2, 0.8]], budgets=[0.5, 1.0], dirpath=str(tmp_path)
    )
    trainer = tiny_trainer(max_steps=1, limit_val_batches=1, callbacks=[callback])
    trainer.fit(_module(), datamodule=tiny_multidigits(num_val=32))
    table = json.loads((tmp_path / "controllability.json").read_text())
    assert len(table["rows"]) == 4 and set(table["controllability"]) == {"0.5", "1.0"}
    assert callback.results is not None and callback.results["mean_controllability"] == table["mean_controllability"]
    pytest.importorskip("matplotlib")
    assert (tmp_path / "controllability.png").read_bytes()[:4] == b"\x89PNG"
