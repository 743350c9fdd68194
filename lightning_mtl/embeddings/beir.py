"""Training pairs from a folder in the BEIR layout (``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``),
with hard negatives from a mined-negatives file, the judged non-relevant documents, or random documents."""

from __future__ import annotations

import csv
import json
import os
import random
from typing import Any

from lightning_mtl.embeddings.pairs import PairsDataModule

__all__ = ["BeirPairsDataModule", "read_beir", "read_jsonl", "read_qrels"]

_QRELS = ("query-id", "corpus-id", "score")


def read_jsonl(path: str, required: tuple[str, ...]) -> list[dict[str, Any]]:
    """The objects of a ``.jsonl`` file, each checked for the ``required`` fields.

    Raises:
        ValueError: a line that is not a JSON object, or one without a required field.
    """
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            missing = [key for key in required if not isinstance(row, dict) or key not in row]
            if missing:
                raise ValueError(
                    f"{path!r} line {number} has no field {missing[0]!r} (each line needs {', '.join(required)})"
                )
            rows.append(row)
    return rows


def read_qrels(path: str) -> list[tuple[str, str, int]]:
    """``(query id, corpus id, grade)`` of a BEIR qrels file (tab-separated, header ``query-id corpus-id score``).

    Raises:
        ValueError: the header lacks one of the three columns.
    """
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t")
        missing = [column for column in _QRELS if column not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(
                f"qrels file {path!r} has no column {missing[0]!r}: its first line must be the tab-separated header "
                "query-id, corpus-id, score"
            )
        return [(str(row["query-id"]), str(row["corpus-id"]), int(float(row["score"]))) for row in reader]


def read_beir(
    folder: str, splits: tuple[str, ...] = ("test",)
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, list[tuple[str, str, int]]]]:
    """The corpus rows, query rows and the qrels of each of ``splits`` of a BEIR-layout folder.

    Raises:
        FileNotFoundError: ``corpus.jsonl``, ``queries.jsonl`` or a ``qrels/<split>.tsv`` is missing.
        ValueError: a row or a qrels file without a needed field (see :func:`read_jsonl`, :func:`read_qrels`).
    """
    names = ["corpus.jsonl", "queries.jsonl", *(f"qrels/{split}.tsv" for split in splits)]
    for name in names:
        if not os.path.isfile(os.path.join(folder, name)):
            raise FileNotFoundError(f"BEIR folder {folder!r} has no {name} ({', '.join(names)} are needed)")
    corpus = read_jsonl(os.path.join(folder, "corpus.jsonl"), ("_id", "text"))
    queries = read_jsonl(os.path.join(folder, "queries.jsonl"), ("_id", "text"))
    return corpus, queries, {split: read_qrels(os.path.join(folder, f"qrels/{split}.tsv")) for split in splits}


def document_text(row: dict[str, Any]) -> str:
    """A corpus row's text with its title in front, as BEIR encodes it."""
    return " ".join(filter(None, (row.get("title", ""), row["text"])))


class BeirPairsDataModule(PairsDataModule):
    """(query, relevant document) training pairs from a BEIR-layout folder, for a
    :class:`~lightning_mtl.embeddings.BiEncoder`.

    Thakur et al., "BEIR: A Heterogeneous Benchmark for Zero-shot Evaluation of Information Retrieval
    Models", NeurIPS 2021 (the layout). Every qrels line with a positive grade whose query and document exist
    is one pair (anchor = the query's text, positive = the document's title and text); ``qrels/train.tsv`` is
    the training split, ``qrels/dev.tsv`` and ``qrels/test.tsv`` (when present) validation and test.

    Hard negatives (``num_negatives`` per pair, the same documents for every pair of a query): first the
    query's documents in ``negatives`` (a ``.jsonl`` of ``{"query-id": ..., "corpus-ids": [...]}``, e.g. mined
    by a retriever), else the documents its qrels grade 0 (judged non-relevant); then, to fill up, random
    documents not relevant to it, drawn by a generator seeded with ``(seed, query id)``, so the negatives are
    the same in every run. Domains (for experts): ``domain_key`` names a field of the query rows (or of their
    ``metadata``).

    Args:
        folder: the BEIR-layout folder.
        num_negatives: hard negatives per pair (0: in-batch negatives only).
        negatives: mined negatives file (``None``: the graded-0 documents, then random ones).
        domain_key: the query field that holds each query's domain (``None``: no domains).
        qrels: the qrels file (without ``.tsv``) of each split: ``{"train": "train", "val": "dev", "test": "test"}``
            by default; ``train``'s must exist, the others are read where present.
        **kwargs: the :class:`~lightning_mtl.embeddings.PairsDataModule` arguments (tokenizer, max_length,
            batch_size, length_bucketing, ...), but not its pair files.
    """

    def __init__(
        self,
        folder: str,
        num_negatives: int = 0,
        negatives: str | None = None,
        domain_key: str | None = None,
        qrels: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        given = sorted(k for k in ("train", "val", "test") if kwargs.get(k) is not None)
        if given:
            raise ValueError(f"BeirPairsDataModule reads its pairs from `folder`: drop {', '.join(given)}")
        super().__init__(**kwargs)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"BEIR folder {folder!r} does not exist")
        if negatives is not None and not os.path.isfile(negatives):
            raise FileNotFoundError(f"negatives file {negatives!r} does not exist")
        if num_negatives < 0:
            raise ValueError(f"num_negatives must be at least 0, got {num_negatives}")
        self.folder, self.num_negatives, self.negatives, self.domain_key = folder, num_negatives, negatives, domain_key
        self.qrels = {"train": "train", "val": "dev", "test": "test"}
        self.qrels.update(qrels or {})
        unknown = set(self.qrels) - {"train", "val", "test"}
        if unknown:
            raise ValueError(f"unknown split(s) {sorted(unknown)} in qrels: give train, val, test")

    def _read(self) -> dict[str, list[dict[str, Any]]]:
        present = tuple(split for split, name in self.qrels.items()
                        if split == "train" or os.path.isfile(os.path.join(self.folder, f"qrels/{name}.tsv")))  # fmt: skip
        corpus_rows, query_rows, judged = read_beir(self.folder, tuple(self.qrels[s] for s in present))
        corpus = {str(row["_id"]): document_text(row) for row in corpus_rows}
        queries = {str(row["_id"]): row for row in query_rows}
        mined: dict[str, list[str]] = {}
        if self.negatives is not None:
            for row in read_jsonl(self.negatives, ("query-id", "corpus-ids")):
                mined[str(row["query-id"])] = [str(i) for i in row["corpus-ids"]]
        splits = {}
        for split in present:
            name = self.qrels[split]
            rows = self._pairs(judged[name], corpus, queries, mined)
            if not rows:
                raise ValueError(
                    f"qrels/{name}.tsv of {self.folder!r} has no line with a positive grade whose query and document "
                    "are in queries.jsonl and corpus.jsonl"
                )
            splits[split] = rows
        return splits

    def _pairs(
        self,
        judged: list[tuple[str, str, int]],
        corpus: dict[str, str],
        queries: dict[str, dict[str, Any]],
        mined: dict[str, list[str]],
    ) -> list[dict[str, Any]]:
        relevant: dict[str, list[str]] = {}
        graded_zero: dict[str, list[str]] = {}
        for query, doc, grade in judged:
            if query in queries and doc in corpus:
                (relevant if grade > 0 else graded_zero).setdefault(query, []).append(doc)
        ids, known = list(corpus), set(corpus)
        rows: list[dict[str, Any]] = []
        for query, docs in relevant.items():
            base: dict[str, Any] = {"anchor": queries[query]["text"]}
            if self.domain_key is not None:
                base["domain"] = self._domain(queries[query])
            if self.num_negatives:
                listed = [d for d in mined.get(query) or graded_zero.get(query, []) if d in known]
                chosen = self._negatives(query, listed, set(docs), ids)
                base["negative"] = [corpus[doc] for doc in chosen]
            rows.extend({**base, "positive": corpus[doc]} for doc in docs)
        return rows

    def _negatives(self, query: str, listed: list[str], relevant: set[str], ids: list[str]) -> list[str]:
        chosen = list(dict.fromkeys(d for d in listed if d not in relevant))[: self.num_negatives]
        free = len(ids) - len(relevant)
        if free < self.num_negatives:
            raise ValueError(
                f"query {query!r} has only {free} documents that are not relevant to it: num_negatives="
                f"{self.num_negatives} cannot be filled"
            )
        rng = random.Random(f"{self.hparams['seed']}:{query}")  # a str seed: the same draw in every run
        taken = set(chosen) | relevant
        while len(chosen) < self.num_negatives:
            doc = ids[rng.randrange(len(ids))]
            if doc not in taken:
                chosen.append(doc)
                taken.add(doc)
        return chosen

    def _domain(self, query: dict[str, Any]) -> Any:
        key = str(self.domain_key)
        value = query.get(key, (query.get("metadata") or {}).get(key))
        if value is None:
            raise ValueError(f"query {query['_id']!r} has no {key!r} field (nor metadata.{key}): domain_key needs one")
        return value
