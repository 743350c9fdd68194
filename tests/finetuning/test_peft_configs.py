"""The PEFT recipes of configs/finetuning/peft run through the real command line, fragments composed."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_mtl.cli import main
from lightning_mtl.finetuning import EDA, docstring_topics

PEFT = Path(__file__).resolve().parents[2] / "configs" / "finetuning" / "peft"
FAST = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
        "--trainer.check_val_every_n_epoch=1", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("fragments", [[], ["prefix", "augment", "supcon"], ["augment", "mixup"]])
def test_the_recipes_train_from_yaml(fragments):
    configs = [arg for name in ["lora", *fragments] for arg in ("--config", str(PEFT / f"{name}.yaml"))]
    cli = main(["fit", *configs, *FAST])
    assert cli.trainer.global_step == 2 and "val/accuracy" in cli.trainer.callback_metrics
    model, data = cli.model, cli.datamodule
    assert model.hparams.adapter == ("prefix" if "prefix" in fragments else "lora")
    assert model.supcon_weight == (0.5 if "supcon" in fragments else 0.0)
    assert (model.mixup is not None) == ("mixup" in fragments)
    assert isinstance(data.augment, EDA) == ("augment" in fragments) and data.num_views == int("augment" in fragments)
    assert "return" in (data.augment.synonyms if data.augment else {"return": 0})


def _stand_in_encoder(folder: Path) -> str:
    """A tiny BERT and its WordPiece tokenizer saved like a downloaded model (MiniLM's extra is not in dev)."""
    import transformers

    words = sorted({w for text, _ in docstring_topics() for w in text.lower().split() if w.isalpha()})[:500]
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]))
    transformers.BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    config = transformers.BertConfig(vocab_size=505, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)  # fmt: skip
    transformers.BertModel(config).save_pretrained(folder)
    return str(folder)


@pytest.mark.slow
def test_the_pretrained_encoder_recipe_reads_a_local_model_and_its_tokenizer(tmp_path):
    folder = _stand_in_encoder(tmp_path)
    configs = [arg for name in ("lora", "minilm", "prefix") for arg in ("--config", str(PEFT / f"{name}.yaml"))]
    cli = main(["fit", *configs, f"--model.init_args.path={folder}", f"--data.init_args.tokenizer={folder}", *FAST])
    assert cli.trainer.global_step == 2 and cli.model.encoder.pooling == "mean"
    ids = cli.datamodule.encode(next(iter(cli.datamodule.val_dataloader())))["input_ids"]
    assert ids[:, 0].eq(2).all() and ids.max() < 505  # [CLS] first: the folder's tokenizer, not the word vocabulary
    assert cli.model.encoder.model.training  # loaded models are put in training mode (dropout runs)
