"""The embedding recipes run through the real command line on the embedded pairs (one step each)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_mtl.cli import main

pytest.importorskip("transformers")

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "embeddings"
FAST = ["--trainer.fast_dev_run=true", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
RECIPES = [[], ["methods/moe.yaml"], ["methods/mnr_plus.yaml"], ["methods/moe.yaml", "methods/mnr_plus.yaml"]]


@pytest.mark.slow
@pytest.mark.parametrize("overlays", RECIPES, ids=lambda o: "+".join(Path(p).stem for p in o) or "quick")
def test_every_embedding_recipe_runs_through_the_cli(overlays):
    args = [a for path in ["quick.yaml", *overlays] for a in ("--config", str(CONFIGS / path))]
    cli = main(["fit", *args, *FAST])
    assert cli.trainer.state.finished and cli.trainer.global_step == 1
    assert cli.model.num_experts == (3 if "methods/moe.yaml" in overlays else 0)
    assert cli.model.loss_fn.registry_name == ("mnr_plus" if "methods/mnr_plus.yaml" in overlays else "mnr")
    assert "val/retrieval/mrr" in cli.trainer.callback_metrics and "val/pair/max_f1" in cli.trainer.callback_metrics


@pytest.mark.slow
def test_the_beir_data_overlay_runs_through_the_cli():
    folder = Path(__file__).with_name("beir_tiny")
    args = [a for path in ("quick.yaml", "data/beir.yaml") for a in ("--config", str(CONFIGS / path))]
    cli = main(["fit", *args, f"--data.init_args.folder={folder}", "--trainer.callbacks=[]", *FAST])
    assert cli.trainer.state.finished and cli.trainer.global_step == 1
    assert type(cli.datamodule).__name__ == "BeirPairsDataModule" and cli.datamodule.hparams["length_bucketing"]
    assert len(cli.datamodule.rows("train")) == 5 and len(cli.datamodule.rows("train")[0]["negative"]) == 1
