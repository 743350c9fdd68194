"""Pair classification by a cosine threshold: max F1 with the threshold chosen on the validation split."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.functional.classification import binary_f1_score

from lightning_mtl.embeddings.pairs import read_rows, truncation_length

__all__ = ["PairClassificationEvaluation", "f1_at_threshold", "labelled_pairs", "max_f1_threshold"]


def max_f1_threshold(scores: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """The best F1 over every threshold of the precision-recall curve, and that threshold (predict a match
    when ``score >= threshold``); ties between scores are cut together.

    Scores are used as they are (cosines in ``[-1, 1]``): torchmetrics' curve would pass scores outside
    ``[0, 1]`` through a sigmoid first and return thresholds on that scale.

    Args:
        scores: ``[N]`` pair similarities.
        labels: ``[N]`` 1 for a matching pair, 0 otherwise (at least one of each).
    """
    labels = labels.float()
    if not 0 < labels.sum() < len(labels):
        raise ValueError("max-F1 needs matching and non-matching pairs (labels 1 and 0)")
    order = scores.argsort(descending=True)
    ranked, hits = scores[order].float(), labels[order]
    tp = hits.cumsum(0)
    predicted = torch.arange(1, len(hits) + 1, dtype=tp.dtype)
    f1 = 2 * tp / (predicted + labels.sum())  # 2PR / (P + R) = 2 TP / (predicted positives + positives)
    last_of_tie = torch.ones_like(ranked, dtype=torch.bool)
    last_of_tie[:-1] = ranked[:-1] != ranked[1:]
    f1 = torch.where(last_of_tie, f1, torch.zeros_like(f1))
    best = int(f1.argmax())
    return f1[best], ranked[best]


def f1_at_threshold(scores: Tensor, labels: Tensor, threshold: float) -> Tensor:
    """F1 of predicting a match when ``score >= threshold``."""
    return binary_f1_score((scores >= threshold).long(), labels.long())


def labelled_pairs(rows: list[dict[str, Any]]) -> list[tuple[str, str, int, int]]:
    """``(a, b, label, domain)`` from positive pairs: each anchor with its positive (1) and with the next
    row's positive (0)."""
    n = len(rows)
    out = [(r["anchor"], r["positive"], 1, r.get("domain", 0)) for r in rows]
    out += [(r["anchor"], rows[(i + 1) % n]["positive"], 0, r.get("domain", 0)) for i, r in enumerate(rows) if n > 1]
    return out


class PairClassificationEvaluation(pl.Callback):
    """Max-F1 pair classification of a bi-encoder by the cosine similarity of the two texts.

    After each validation epoch the threshold that maximises F1 on the validation pairs is chosen and
    logged (``val/pair/max_f1``, ``pair/threshold``); at test time that threshold is applied to the
    test pairs (``test/pair/f1``). The official code of Hallee et al. (arXiv 2401.15713) picks the threshold
    on the evaluation set itself, an optimistic number: it is logged too, as ``test/pair/max_f1_on_test``.
    The threshold is part of the callback's state (checkpoints).

    Args:
        val: labelled pairs file (``a``, ``b``, ``label``[, ``domain``] columns; jsonl/json/csv); ``None``:
            built from the data module's validation pairs (:func:`labelled_pairs`).
        test: the same for the test split (``None``: the data module's test pairs, when it has some).
        domain: expert id every text uses (``None``: each pair's own domain).
        batch_size: texts per forward pass.
        max_length: truncation length in tokens (``None``: the data module's ``max_length``).
    """

    def __init__(
        self,
        val: str | None = None,
        test: str | None = None,
        domain: int | None = None,
        batch_size: int = 64,
        max_length: int | None = None,
    ) -> None:
        self.files = {"val": val, "test": test}
        self.domain, self.batch_size, self.max_length = domain, batch_size, max_length
        self.threshold: float | None = None

    def _pairs(self, trainer: pl.Trainer, split: str) -> list[tuple[str, str, int, int]]:
        path = self.files[split]
        if path is None:
            return labelled_pairs(trainer.datamodule.rows(split))  # type: ignore[attr-defined]
        rows = read_rows(path)
        for column in ("a", "b", "label"):
            if column not in rows[0]:
                raise ValueError(f"pairs file {path!r} has no column {column!r} (columns: {', '.join(rows[0])})")
        return [(r["a"], r["b"], int(r["label"]), int(r.get("domain", 0))) for r in rows]

    def _scores(self, trainer: pl.Trainer, module: pl.LightningModule, split: str) -> tuple[Tensor, Tensor]:
        pairs = self._pairs(trainer, split)
        tokenizer = trainer.datamodule.tokenizer  # type: ignore[attr-defined]
        domains = [p[3] for p in pairs] if self.domain is None else self.domain
        encode: Any = module.encode  # a BiEncoder (or any module with its encode)
        length = truncation_length(trainer, self.max_length)
        a = encode([p[0] for p in pairs], tokenizer, domains, self.batch_size, length)
        b = encode([p[1] for p in pairs], tokenizer, domains, self.batch_size, length)
        return F.cosine_similarity(a, b, dim=-1).cpu(), torch.tensor([p[2] for p in pairs])

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        directions = getattr(pl_module, "metric_directions", None)
        if isinstance(directions, dict):
            directions.update({"val/pair/max_f1": True, "test/pair/f1": True, "test/pair/max_f1_on_test": True})

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        f1, threshold = max_f1_threshold(*self._scores(trainer, pl_module, "val"))
        self.threshold = float(threshold)
        pl_module.log("val/pair/max_f1", f1.to(pl_module.device))
        pl_module.log("pair/threshold", threshold.to(pl_module.device))  # not a score: outside val/

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.threshold is None:
            raise RuntimeError("PairClassificationEvaluation has no threshold yet: validate before testing")
        scores, labels = self._scores(trainer, pl_module, "test")
        pl_module.log("test/pair/f1", f1_at_threshold(scores, labels, self.threshold).to(pl_module.device))
        pl_module.log("test/pair/max_f1_on_test", max_f1_threshold(scores, labels)[0].to(pl_module.device))

    def state_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.threshold = state_dict["threshold"]
