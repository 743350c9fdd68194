"""Retrieval evaluation of a bi-encoder (Recall@k, MRR, nDCG@k through torchmetrics) on a BEIR-layout folder
or on the validation pairs of the data module."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.retrieval import RetrievalMRR, RetrievalNormalizedDCG, RetrievalRecall

from lightning_mtl.embeddings.beir import document_text, read_beir
from lightning_mtl.embeddings.pairs import truncation_length

__all__ = ["RetrievalEvaluation", "RetrievalSet", "load_beir", "retrieval_metrics"]


@dataclass
class RetrievalSet:
    """Queries, a corpus and graded relevance ``qrels[query_index] = {corpus_index: grade}``."""

    queries: list[str]
    corpus: list[str]
    qrels: dict[int, dict[int, int]]
    query_domains: list[int] | None = None  # the expert of each text, where known
    corpus_domains: list[int] | None = None


def load_beir(folder: str, split: str = "test") -> RetrievalSet:
    """Read a BEIR-layout folder: ``corpus.jsonl`` (``_id``, ``title``, ``text``), ``queries.jsonl``
    (``_id``, ``text``) and ``qrels/<split>.tsv`` (``query-id``, ``corpus-id``, ``score`` with a header).
    Only queries with a positive grade are kept; titles are prefixed to the text as BEIR does."""
    corpus_rows, query_rows, judged = read_beir(folder, (split,))
    corpus_index = {str(row["_id"]): i for i, row in enumerate(corpus_rows)}
    query_text = {str(row["_id"]): row["text"] for row in query_rows}
    grades: dict[str, dict[int, int]] = {}
    for query, doc, grade in judged[split]:
        if grade > 0 and doc in corpus_index and query in query_text:
            grades.setdefault(query, {})[corpus_index[doc]] = grade
    ids = sorted(grades)
    corpus = [document_text(row) for row in corpus_rows]
    return RetrievalSet([query_text[q] for q in ids], corpus, {i: grades[q] for i, q in enumerate(ids)})


def retrieval_metrics(
    scores: Tensor, qrels: dict[int, dict[int, int]], ks: tuple[int, ...] = (1, 5, 10)
) -> dict[str, Tensor]:
    """``recall@k`` for each k, ``mrr`` and ``ndcg@<max k>`` of a ``[queries, corpus]`` score matrix.

    Args:
        scores: similarity of every query to every corpus entry.
        qrels: graded relevance per query index (a missing entry is grade 0).
        ks: cut-offs of the recall; nDCG is cut at the largest.
    """
    n_queries, n_corpus = scores.shape
    grades = torch.zeros(n_queries, n_corpus, dtype=torch.long)
    for query, docs in qrels.items():
        for doc, grade in docs.items():
            grades[query, doc] = grade
    preds, target = scores.float().cpu().flatten(), grades.flatten()
    indexes = torch.arange(n_queries).repeat_interleave(n_corpus)
    out = {f"recall@{k}": RetrievalRecall(top_k=k)(preds, target > 0, indexes=indexes) for k in ks}
    out["mrr"] = RetrievalMRR()(preds, target > 0, indexes=indexes)
    out[f"ndcg@{max(ks)}"] = RetrievalNormalizedDCG(top_k=max(ks))(preds, target, indexes=indexes)
    return out


class RetrievalEvaluation(pl.Callback):
    """Encode queries and corpus with the module's :meth:`~lightning_mtl.embeddings.BiEncoder.encode` after
    each validation epoch and log Recall@k, MRR and nDCG@k (cosine similarity, exhaustive search).

    Thakur et al., "BEIR: A Heterogeneous Benchmark for Zero-shot Evaluation of Information Retrieval
    Models", NeurIPS 2021 (the on-disk layout). Without ``folder`` the data module's validation pairs are the
    set: each anchor a query, the positives the corpus, its own positive the one relevant entry. Every rank
    computes the same numbers (the set is encoded whole on each), so the logged values need no reduction.

    Args:
        folder: a BEIR-layout folder (``None``: the validation pairs).
        split: the qrels file of ``folder`` (``qrels/<split>.tsv``).
        ks: recall cut-offs; nDCG is cut at the largest.
        domain: expert id every text uses (``None``: the validation pairs' own domains; a BEIR folder with a
            model with experts needs one).
        batch_size: texts per forward pass.
        max_length: truncation length in tokens (``None``: the data module's ``max_length``).
        prefix: the logged keys are ``<prefix>/recall@k``, ``<prefix>/mrr``, ``<prefix>/ndcg@k``.
    """

    def __init__(
        self,
        folder: str | None = None,
        split: str = "test",
        ks: tuple[int, ...] = (1, 5, 10),
        domain: int | None = None,
        batch_size: int = 64,
        max_length: int | None = None,
        prefix: str = "val/retrieval",
    ) -> None:
        self.folder, self.split, self.ks, self.domain = folder, split, tuple(ks), domain
        self.batch_size, self.max_length, self.prefix = batch_size, max_length, prefix
        self.data: RetrievalSet | None = load_beir(folder, split) if folder is not None else None

    def _set(self, trainer: pl.Trainer) -> RetrievalSet:
        if self.data is None:
            rows = trainer.datamodule.rows("val")  # type: ignore[attr-defined]
            domain_of = {row["positive"]: row.get("domain", 0) for row in rows}
            corpus = sorted(domain_of)
            where = {text: i for i, text in enumerate(corpus)}
            qrels = {i: {where[row["positive"]]: 1} for i, row in enumerate(rows)}
            self.data = RetrievalSet([row["anchor"] for row in rows], corpus, qrels)
            if "domain" in rows[0]:
                self.data.query_domains = [row["domain"] for row in rows]
                self.data.corpus_domains = [domain_of[text] for text in corpus]
        return self.data

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        directions = getattr(pl_module, "metric_directions", None)
        if isinstance(directions, dict):  # for BestMetricsSummary: every retrieval score is higher-better
            keys = [*(f"recall@{k}" for k in self.ks), "mrr", f"ndcg@{max(self.ks)}"]
            directions.update({f"{self.prefix}/{key}": True for key in keys})

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        data = self._set(trainer)
        tokenizer = trainer.datamodule.tokenizer  # type: ignore[attr-defined]
        kwargs = dict(batch_size=self.batch_size, max_length=truncation_length(trainer, self.max_length))
        encode: Any = pl_module.encode  # a BiEncoder (or any module with its encode)
        # a fixed domain wins; else each text its own (the validation pairs know theirs)
        queries = encode(
            data.queries, tokenizer, self.domain if self.domain is not None else data.query_domains, **kwargs
        )
        corpus = encode(
            data.corpus, tokenizer, self.domain if self.domain is not None else data.corpus_domains, **kwargs
        )
        queries, corpus = F.normalize(queries, dim=-1), F.normalize(corpus, dim=-1)
        for name, value in retrieval_metrics(queries @ corpus.T, data.qrels, self.ks).items():
            pl_module.log(f"{self.prefix}/{name}", value.to(pl_module.device))
