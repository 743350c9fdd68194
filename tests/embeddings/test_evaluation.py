"""Retrieval metrics on a BEIR-layout fixture against hand-computed values; max-F1 against a brute-force search
over thresholds; both callbacks in a fit on the embedded pairs (threshold chosen on val, applied at test)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lightning_mtl.embeddings import (
    BiEncoder,
    PairClassificationEvaluation,
    PairsDataModule,
    RetrievalEvaluation,
    f1_at_threshold,
    load_beir,
    max_f1_threshold,
    retrieval_metrics,
)
from tests.fixtures.trainers import tiny_trainer

pytest.importorskip("transformers")


def write_beir(folder):
    """A three-document, two-query BEIR folder (one query without a positive grade is dropped)."""
    (folder / "qrels").mkdir(parents=True)
    corpus = [{"_id": "d1", "title": "Sorting", "text": "use sorted"}, {"_id": "d2", "title": "", "text": "paris"},
              {"_id": "d3", "text": "the nile"}]  # fmt: skip
    queries = [{"_id": "q1", "text": "how to sort"}, {"_id": "q2", "text": "capital of france"},
               {"_id": "q3", "text": "unjudged"}]  # fmt: skip
    (folder / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus))
    (folder / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in queries))
    (folder / "qrels/test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t2\nq1\td3\t1\nq2\td2\t1\nq3\td3\t0\n")
    return str(folder)


def test_load_beir_reads_the_layout_and_names_missing_files(tmp_path):
    data = load_beir(write_beir(tmp_path / "beir"))
    assert data.queries == ["how to sort", "capital of france"]
    assert data.corpus == ["Sorting use sorted", "paris", "the nile"]
    assert data.qrels == {0: {0: 2, 2: 1}, 1: {1: 1}}
    with pytest.raises(FileNotFoundError, match=r"has no qrels/dev.tsv"):
        load_beir(str(tmp_path / "beir"), split="dev")


def test_retrieval_metrics_equal_hand_values():
    scores = torch.tensor([[0.1, 0.5, 0.9], [0.2, 0.8, 0.3]])  # q0 ranks d2, d1, d0; q1 ranks d1 first
    qrels = {0: {0: 2, 2: 1}, 1: {1: 1}}
    out = retrieval_metrics(scores, qrels, ks=(1, 2))
    assert out["recall@1"].item() == pytest.approx((1 / 2 + 1) / 2)
    assert out["recall@2"].item() == pytest.approx((1 / 2 + 1) / 2)
    assert out["mrr"].item() == pytest.approx(1.0)
    # nDCG@2 of q0: gains (2^g - 1) of the ranking [d2 (g=1), d1 (g=0)] vs the ideal [d0 (g=2), d2 (g=1)]
    dcg = 1 / math.log2(2)
    ideal = 3 / math.log2(2) + 1 / math.log2(3)
    # torchmetrics' nDCG uses the grade itself as the gain (not 2^g - 1)
    dcg_linear, ideal_linear = 1.0, 2.0 + 1 / math.log2(3)
    assert out["ndcg@2"].item() == pytest.approx((dcg_linear / ideal_linear + 1.0) / 2, rel=1e-5)
    assert dcg / ideal != pytest.approx(dcg_linear / ideal_linear)  # the two conventions differ here


def test_max_f1_threshold_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(40, generator=g) * 2 - 1
    scores[5] = scores[6]  # a tie
    labels = (scores + 0.5 * torch.randn(40, generator=g) > 0).long()
    best, threshold = max_f1_threshold(scores, labels)
    brute = max(f1_at_threshold(scores, labels, t.item()).item() for t in scores)
    assert best.item() == pytest.approx(brute, rel=1e-6)
    assert f1_at_threshold(scores, labels, threshold.item()).item() == pytest.approx(best.item(), rel=1e-6)
    with pytest.raises(ValueError, match="needs matching and non-matching pairs"):
        max_f1_threshold(scores, torch.ones(40))


@pytest.mark.slow
def test_callbacks_log_metrics_and_apply_the_validation_threshold_at_test():
    torch.manual_seed(0)
    data = PairsDataModule(per_domain=40, val_fraction=0.25, batch_size=16, vocab_size=400)
    config = dict(model_type="bert", vocab_size=400, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=32, max_position_embeddings=128)  # fmt: skip
    module = BiEncoder(config=config, num_experts=3)
    pairs = PairClassificationEvaluation()
    trainer = tiny_trainer(max_epochs=1, limit_train_batches=2, callbacks=[RetrievalEvaluation(ks=(1, 5)), pairs])
    trainer.fit(module, data)
    metrics = trainer.callback_metrics
    assert {"val/retrieval/recall@1", "val/retrieval/recall@5", "val/retrieval/mrr", "val/retrieval/ndcg@5",
            "val/pair/max_f1", "pair/threshold", "val/loss"} <= set(metrics)  # fmt: skip
    assert module.metric_directions["val/retrieval/ndcg@5"] and not module.metric_directions["val/loss"]
    assert metrics["val/retrieval/recall@1"] <= metrics["val/retrieval/recall@5"]
    assert pairs.threshold == pytest.approx(metrics["pair/threshold"].item())
    data.splits["test"] = data.rows("val")  # the same pairs: the val threshold is then the best one
    results = trainer.test(module, data, verbose=False)[0]
    assert results["test/pair/f1"] == pytest.approx(results["test/pair/max_f1_on_test"], rel=1e-6)
    assert results["test/pair/f1"] == pytest.approx(metrics["val/pair/max_f1"].item(), rel=1e-6)
