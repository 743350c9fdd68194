"""Teacher pair scores for distillation: a cross-encoder run once and cached on disk by content hash, an
offline teacher for the embedded corpus, and a data module of scored pairs."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_mtl.embeddings.embedded import embedded_pairs
from lightning_mtl.embeddings.pairs import PairsDataModule

__all__ = ["ScoredPairsDataModule", "cached_teacher_scores", "embedded_scored_pairs", "overlap_teacher"]

Teacher = Callable[[list[str], list[str]], Tensor]


def _fingerprint(teacher: Teacher) -> str:
    """What identifies a teacher: its class and, for a module, every parameter and buffer."""
    digest = hashlib.sha256(f"{type(teacher).__module__}.{type(teacher).__qualname__}".encode())
    if isinstance(teacher, nn.Module):
        for name, tensor in sorted(teacher.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    else:
        digest.update(getattr(teacher, "__qualname__", repr(teacher)).encode())
    return digest.hexdigest()


def cached_teacher_scores(
    anchors: list[str], positives: list[str], teacher: Teacher, cache_dir: str | None = None, batch_size: int = 64
) -> Tensor:
    """The teacher's scores of the pairs ``(anchors[i], positives[i])``, computed once: the result is saved
    as ``<cache_dir>/<sha256>.pt``, the hash covering the texts and the teacher (its weights when it is a
    module), and loaded from there on the next call.

    Args:
        anchors: first texts.
        positives: second texts, one per anchor.
        teacher: a cross-encoder: ``teacher(first_texts, second_texts)`` -> ``[n]`` or ``[n, C]`` scores.
        cache_dir: folder of the cache (created); ``None``: no cache.
        batch_size: pairs per teacher call (in eval mode, no gradients).
    """
    if len(anchors) != len(positives):
        raise ValueError(f"{len(anchors)} anchors but {len(positives)} positives: give one positive per anchor")
    path = None
    if cache_dir is not None:
        key = hashlib.sha256(json.dumps([anchors, positives]).encode() + _fingerprint(teacher).encode())
        path = Path(cache_dir) / f"{key.hexdigest()}.pt"
        if path.is_file():
            return torch.load(path, weights_only=True)
    training = teacher.training if isinstance(teacher, nn.Module) else False
    if isinstance(teacher, nn.Module):
        teacher.eval()
    with torch.no_grad():
        parts = [teacher(anchors[i : i + batch_size], positives[i : i + batch_size]).detach().float().cpu()
                 for i in range(0, len(anchors), batch_size)]  # fmt: skip
    if isinstance(teacher, nn.Module):
        teacher.train(training)
    scores = torch.cat(parts) if parts else torch.zeros(0)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(scores, tmp)
        tmp.replace(path)  # atomic: a concurrent reader never sees half a file
    return scores


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def overlap_teacher(anchors: list[str], positives: list[str], labels: list[int]) -> Tensor:
    """The offline teacher of the embedded corpus: ``0.8 * label + 0.2 * jaccard(words(a), words(b))``, a
    graded score in ``[0, 1]`` that sees both texts (as a cross-encoder does) and knows the gold label (as a
    cross-encoder fine-tuned on it approximates)."""
    scores = []
    for a, b, label in zip(anchors, positives, labels):
        wa, wb = _words(a), _words(b)
        scores.append(0.8 * label + 0.2 * len(wa & wb) / max(1, len(wa | wb)))
    return torch.tensor(scores)


def embedded_scored_pairs(per_domain: int = 300, seed: int = 0) -> list[dict[str, Any]]:
    """The embedded pairs, each anchor twice: with its positive (label 1) and with another positive of its
    domain (label 0), scored by :func:`overlap_teacher` (``score``)."""
    rows = embedded_pairs(per_domain, seed)
    rng = random.Random(seed + 1)
    by_domain: dict[str, list[str]] = {}
    for row in rows:
        by_domain.setdefault(row["domain"], []).append(row["positive"])
    out: list[dict[str, Any]] = []
    for row in rows:
        pool = [p for p in by_domain[row["domain"]] if p != row["positive"]]
        out.append({**row, "label": 1})
        if pool:
            out.append({**row, "positive": rng.choice(pool), "label": 0})
    scores = overlap_teacher([r["anchor"] for r in out], [r["positive"] for r in out], [r["label"] for r in out])
    for row, score in zip(out, scores.tolist()):
        row["score"] = score
    return out


class ScoredPairsDataModule(PairsDataModule):
    """Pairs with teacher scores for :class:`~lightning_mtl.embeddings.DistilledSentenceEmbedding`.

    Scores come from the files' ``score`` column (see ``columns``), or from ``teacher`` (a cross-encoder
    module or callable, run once per split through :func:`cached_teacher_scores`). Without ``train``: the
    embedded corpus of :func:`embedded_scored_pairs` (scores of the offline :func:`overlap_teacher`), split
    by anchor so that no anchor is in both splits. The loaders yield every scored pair; :meth:`rows` (what the
    evaluation callbacks read) gives the matching pairs only (``label`` 1) when the rows have labels.

    Args:
        teacher: a cross-encoder ``teacher(first_texts, second_texts) -> scores``; ``None``: file scores.
        teacher_cache: cache folder for the teacher's scores (``None``: computed every run).
        **kwargs: the :class:`~lightning_mtl.embeddings.PairsDataModule` arguments.
    """

    def __init__(self, teacher: Any = None, teacher_cache: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.teacher, self.teacher_cache = teacher, teacher_cache

    def _read(self) -> dict[str, list[dict[str, Any]]]:
        if self.files["train"] is None:
            rows = embedded_scored_pairs(self.hparams["per_domain"], self.hparams["seed"])
            anchors = list(dict.fromkeys(row["anchor"] for row in rows))
            held = set(anchors[: int(round(len(anchors) * self.hparams["val_fraction"]))])
            self.domain_names = self.domain_names or ["functions", "classes", "paraphrases"]
            splits = {
                "train": [r for r in rows if r["anchor"] not in held],
                "val": [r for r in rows if r["anchor"] in held],
            }
        else:
            splits = super()._read()
        for split, rows in splits.items():
            if self.teacher is not None:
                scores = cached_teacher_scores([r["anchor"] for r in rows], [r["positive"] for r in rows],
                                               self.teacher, self.teacher_cache)  # fmt: skip
                for row, score in zip(rows, scores.tolist()):
                    row["score"] = score
            missing = sum("score" not in row for row in rows)
            if missing:
                raise ValueError(
                    f"{missing} {split} pairs have no teacher score: give a score column (columns: {{score: ...}}) "
                    "or a teacher"
                )
        return splits

    def rows(self, split: str) -> list[dict[str, Any]]:
        """The matching pairs of a split (``label`` 1; every pair when there are no labels), after ``setup``."""
        rows = super().rows(split)
        return [row for row in rows if int(row.get("label", 1)) == 1]

    def loader_rows(self, split: str) -> list[dict[str, Any]]:
        """Every scored pair of a split (matching or not), for the loaders."""
        return super().rows(split)
