"""Limited-data text classification: a few labelled sentences per class, augmented on the fly."""

from __future__ import annotations

import csv
import json
import os
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_mtl.datamodules import EpochShuffleSampler, check_data_path
from lightning_mtl.datamodules.text import WordVocabulary
from lightning_mtl.finetuning.docstring_topics import docstring_topics
from lightning_mtl.finetuning.eda import EDA

__all__ = ["FewShotText"]


def _read_rows(path: str, text_column: str, label_column: str) -> list[tuple[str, str]]:
    check_data_path(path, "FewShotText", "expected a .jsonl or .csv file with a text and a label column")
    if path.endswith(".jsonl"):
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    elif path.endswith(".csv"):
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        raise ValueError(f"{path}: unsupported file type; use .jsonl or .csv")
    absent = [c for c in (text_column, label_column) if rows and c not in rows[0]]
    if absent:
        raise ValueError(f"{path} has no column(s) {absent}; it has: {', '.join(rows[0])}")
    return [(str(r[text_column]), str(r[label_column])) for r in rows]


class FewShotText(pl.LightningDataModule):
    """``per_class`` labelled sentences per class for training, the rest for validation and test; training
    batches get ``num_views`` augmented copies of each sentence.

    The limited-data setting of Obadinma, Guo and Zhu, "Effectiveness of Data Augmentation for Parameter
    Efficient Tuning with Limited Data", RepL4NLP 2023. Sentences come from a ``.jsonl`` / ``.csv`` file
    (``train``; ``test`` optional) or, by default, from the embedded :func:`docstring_topics` task (four
    topics of Python standard library docstrings). The pool is shuffled with ``seed`` and split per class:
    ``per_class`` for training, ``val_per_class`` for validation, up to ``test_per_class`` for testing (from
    ``test`` when given).

    Augmentation happens in :meth:`on_before_batch_transfer`, in the main process: each training batch holds
    the ``B`` original sentences followed by ``num_views`` blocks of ``B`` augmented copies (``augment``, an
    :class:`EDA`), the copy ``v`` of sample ``i`` in epoch ``e`` being ``augment.augment(text, e, i, v)``; so
    the batches depend only on ``seed``, the epoch and the sample, under DDP (each rank augments its own
    samples) and after a resume alike. Validation and test batches are never augmented.

    Tokens: a local ``transformers`` tokenizer folder (``tokenizer``), or a :class:`WordVocabulary` built on
    every sentence that is not in the test split (no labels are used). Ids are padded / cut to
    ``max_length``. Batches: ``{"input_ids": long [N, max_length], "labels": long [N]}`` with
    ``N = B * (1 + num_views)`` in training.

    Args:
        train: ``.jsonl`` / ``.csv`` file of the pool (default: the embedded docstring topics).
        test: optional test file (default: the pool's rest).
        text_column: column of the sentence.
        label_column: column of the class.
        per_class: training sentences per class.
        val_per_class: validation sentences per class.
        test_per_class: at most this many test sentences per class.
        augment: the augmentation (default none).
        num_views: augmented copies of each training sentence per batch.
        tokenizer: local folder of a ``transformers`` tokenizer.
        max_length: tokens per sentence.
        max_vocab: size of the built-in vocabulary.
        batch_size: original sentences per batch.
        shuffle: shuffle the training sentences each epoch.
        seed: seed of the split and of the order.
    """

    def __init__(
        self,
        train: str | None = None,
        test: str | None = None,
        text_column: str = "text",
        label_column: str = "label",
        per_class: int = 16,
        val_per_class: int = 16,
        test_per_class: int = 64,
        augment: EDA | None = None,
        num_views: int = 0,
        tokenizer: str | None = None,
        max_length: int = 48,
        max_vocab: int = 2048,
        batch_size: int = 16,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if per_class < 1 or val_per_class < 0 or test_per_class < 0:
            raise ValueError("per_class must be >= 1 and val_per_class, test_per_class >= 0")
        if num_views < 0 or (num_views > 0 and augment is None):
            raise ValueError(f"num_views = {num_views} needs an `augment` (e.g. EDA) and must be >= 0")
        self.save_hyperparameters(ignore=["augment"])
        self.files, self.columns = (train, test), (text_column, label_column)
        self.per_class, self.val_per_class, self.test_per_class = per_class, val_per_class, test_per_class
        self.augment, self.num_views = augment, int(num_views)
        self.tokenizer_path, self.max_length, self.max_vocab = tokenizer, int(max_length), int(max_vocab)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.classes: list[str] = []
        self.splits: dict[str, list[tuple[str, int]]] = {}
        self.vocabulary: WordVocabulary | None = None
        self.tokenizer: Any = None

    # -- data ----------------------------------------------------------------------------------
    def _pool(self) -> tuple[list[tuple[str, str]], list[tuple[str, str]] | None]:
        train, test = self.files
        pool = docstring_topics() if train is None else _read_rows(train, *self.columns)
        return pool, (None if test is None else _read_rows(test, *self.columns))

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        pool, test_rows = self._pool()
        self.classes = sorted({label for _, label in pool})
        index = {c: i for i, c in enumerate(self.classes)}
        order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(self.seed)).tolist()
        by_class: dict[int, list[str]] = {i: [] for i in range(len(self.classes))}
        for i in order:
            by_class[index[pool[i][1]]].append(pool[i][0])
        short = [self.classes[c] for c, texts in by_class.items() if len(texts) < self.per_class + self.val_per_class]
        if short:
            raise ValueError(f"classes {short} have fewer than per_class + val_per_class sentences")
        splits: dict[str, list[tuple[str, int]]] = {"train": [], "val": [], "test": [], "rest": []}
        cut = self.per_class + self.val_per_class
        for c, texts in by_class.items():
            splits["train"] += [(t, c) for t in texts[: self.per_class]]
            splits["val"] += [(t, c) for t in texts[self.per_class : cut]]
            if test_rows is None:
                splits["test"] += [(t, c) for t in texts[cut : cut + self.test_per_class]]
                splits["rest"] += [(t, c) for t in texts[cut + self.test_per_class :]]
        if test_rows is not None:
            unknown = sorted({label for _, label in test_rows} - set(index))
            if unknown:
                raise ValueError(f"test labels {unknown} do not occur in the training pool")
            splits["test"] = [(t, index[label]) for t, label in test_rows]
        self.splits = splits
        self._build_tokenizer([t for name in ("train", "val", "rest") for t, _ in splits[name]])

    def _build_tokenizer(self, texts: list[str]) -> None:
        if self.tokenizer_path is None:
            self.vocabulary = WordVocabulary(texts, max_size=self.max_vocab)
            return
        try:
            from transformers import AutoTokenizer
        except ImportError as error:
            raise ImportError("FewShotText(tokenizer=...) needs the optional `transformers` package") from error
        if not os.path.isdir(self.tokenizer_path):
            raise FileNotFoundError(f"no tokenizer folder at '{self.tokenizer_path}'")
        self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path, local_files_only=True)

    def _tokenize(self, texts: list[str]) -> Tensor:
        if self.tokenizer is None:
            assert self.vocabulary is not None  # setup() built one or the other
            return self.vocabulary.encode(texts, self.max_length)
        out = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")  # fmt: skip
        return out["input_ids"]

    @property
    def num_classes(self) -> int:
        self.setup()
        return len(self.classes)

    # -- batches -------------------------------------------------------------------------------
    def encode(self, batch: dict[str, Any], epoch: int | None = None) -> dict[str, Tensor]:
        """Token ids and labels of a collated batch; with ``epoch``, followed by the augmented copies."""
        texts, labels, indices = list(batch["text"]), batch["labels"], batch["index"].tolist()
        if epoch is not None and self.num_views:
            assert self.augment is not None  # checked in __init__
            for view in range(1, self.num_views + 1):
                texts += [self.augment.augment(t, epoch, i, view) for t, i in zip(batch["text"], indices)]
            labels = labels.repeat(1 + self.num_views)
        return {"input_ids": self._tokenize(texts), "labels": labels}

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if "input_ids" in batch:
            return batch
        trainer = self.trainer
        training = trainer is not None and trainer.training
        return self.encode(batch, trainer.current_epoch if training and trainer is not None else None)

    @staticmethod
    def _collate(items: list[tuple[int, str, int]]) -> dict[str, Any]:
        return {
            "index": torch.tensor([i for i, _, _ in items], dtype=torch.long),
            "text": [t for _, t, _ in items],
            "labels": torch.tensor([y for _, _, y in items], dtype=torch.long),
        }

    def _loader(self, split: str, train: bool = False) -> DataLoader:
        self.setup()
        items = [(i, t, y) for i, (t, y) in enumerate(self.splits[split])]
        sampler = EpochShuffleSampler(items, seed=self.seed, shuffle=train and self.shuffle)
        return DataLoader(items, batch_size=self.batch_size, sampler=sampler, collate_fn=self._collate)  # type: ignore[arg-type]

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
