"""Multi-label text classification data: an embedded corpus of Python docstrings labelled by keyword groups,
or ``.jsonl`` / ``.json`` / ``.csv`` files with a text column and a labels column."""

from __future__ import annotations

import inspect
import os
import random
import re
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_mtl._stdlib_docs import public_members
from lightning_mtl.datamodules import EpochShuffleSampler
from lightning_mtl.datamodules.text import WordVocabulary, load_records

__all__ = ["EMBEDDED_LABELS", "MultiLabelText", "embedded_docstrings"]

_INSTALL = (
    "MultiLabelText(tokenizer=...) needs the optional `transformers` package: pip install 'lightning-mtl[transformers]'"
)

# a docstring carries a label when it uses one of the label's words: several labels per text, as a company
# description touches several industry sectors
EMBEDDED_LABELS: dict[str, str] = {
    "files": r"files?|paths?|director(?:y|ies)|folders?|filenames?",
    "text": r"strings?|text|characters?|unicode|lines?|bytes",
    "numbers": r"numbers?|integers?|floats?|floating|decimal|fractions?|numeric",
    "time": r"times?|dates?|seconds?|clock|timestamps?|timeout|days?",
    "errors": r"errors?|exceptions?|raises?|raised|warnings?",
    "collections": r"lists?|dict|dictionar(?:y|ies)|sequences?|iterables?|iterators?|tuples?|mappings?",
}

_MODULES = (
    "array", "base64", "bisect", "calendar", "collections", "colorsys", "contextlib", "copy", "csv", "datetime",
    "decimal", "difflib", "fnmatch", "fractions", "functools", "glob", "gzip", "hashlib", "heapq", "hmac", "html",
    "inspect", "io", "ipaddress", "itertools", "json", "keyword", "linecache", "locale", "logging", "math",
    "mimetypes", "operator", "os", "os.path", "pathlib", "pickle", "platform", "pprint", "queue", "random", "re",
    "secrets", "shlex", "shutil", "socket", "statistics", "string", "struct", "subprocess", "tarfile", "tempfile",
    "textwrap", "threading", "time", "tokenize", "traceback", "types", "unicodedata", "urllib.parse", "uuid",
    "warnings", "weakref", "zipfile", "zlib",
)  # fmt: skip


def embedded_docstrings(max_words: int = 64, seed: int = 0) -> list[dict[str, Any]]:
    """Rows ``{"text", "labels"}``: the first ``max_words`` words of the docstrings of standard-library
    functions and classes, each labelled by the keyword groups of :data:`EMBEDDED_LABELS` it mentions; texts
    without any label are left out. About 740 rows on CPython 3.11 (they follow the running Python's
    docstrings), shuffled with ``seed``.
    """
    patterns = {name: re.compile(rf"\b(?:{words})\b", re.IGNORECASE) for name, words in EMBEDDED_LABELS.items()}
    rows, seen = [], set()
    for _, _, obj in public_members(_MODULES):
        text = " ".join((inspect.getdoc(obj) or "").split()[:max_words])
        if len(text.split()) < 5 or text in seen:  # re-exports share one docstring
            continue
        seen.add(text)
        labels = [label for label, pattern in patterns.items() if pattern.search(text)]
        if labels:
            rows.append({"text": text, "labels": labels})
    random.Random(seed).shuffle(rows)
    return rows


def _label_list(cell: Any) -> list[str]:
    """A labels cell: a list of names (json) or names separated by ``;`` (csv); empty means no label."""
    if cell is None:
        return []
    if isinstance(cell, str):
        return [name.strip() for name in cell.split(";") if name.strip()]
    return [str(name) for name in cell]


class _Encoded(torch.utils.data.Dataset):
    def __init__(self, ids: list[list[int]], targets: Tensor) -> None:
        self.ids, self.targets = ids, targets

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[list[int], Tensor]:
        return self.ids[index], self.targets[index]


class MultiLabelText(pl.LightningDataModule):
    """Texts with any number of labels each, for :class:`~lightning_mtl.finetuning.PromptTunedClassifier`.

    Without ``train``, the embedded corpus of :func:`embedded_docstrings` (Python's own docstrings, six
    keyword-derived labels) is split into train / val / test by ``val_fraction`` and ``test_fraction``.
    Files are ``.jsonl`` / ``.json`` (``{"text": "...", "labels": ["a", "b"]}``) or ``.csv`` (labels joined
    by ``;``); without ``val``, ``val_fraction`` of the training file is held out (the classifier chooses its
    thresholds there).

    Tokens come from a local ``transformers`` tokenizer folder (``tokenizer``; nothing is downloaded) or, by
    default, from a word vocabulary built on the training texts (id 0 pads, 1 is unknown). Batches:
    ``input_ids`` and ``attention_mask`` ``[B, T]`` (right-padded to the batch's longest text) and ``labels``
    float ``[B, K]`` (1 where the text has the label). The training order depends only on ``seed`` and the
    epoch, so a resumed run sees the batches of an uninterrupted one.

    Args:
        train: training file (``None``: the embedded corpus).
        val: validation file.
        test: test file.
        text_column: column with the text.
        labels_column: column with the labels.
        label_names: the labels in output order (default: sorted names found in the training split).
        tokenizer: local folder of a ``transformers`` tokenizer.
        max_length: truncation length in tokens.
        max_vocab: size of the built-in word vocabulary.
        batch_size: texts per batch (per rank under DDP).
        num_workers: data-loader workers.
        val_fraction: share held out for validation (embedded corpus, or a training file without ``val``).
        test_fraction: share of the embedded corpus held out for testing.
        max_words: words kept of each embedded docstring.
        shuffle: shuffle the training texts every epoch.
        seed: shuffles the embedded corpus, the held-out split and the training order.
    """

    def __init__(
        self,
        train: str | None = None,
        val: str | None = None,
        test: str | None = None,
        text_column: str = "text",
        labels_column: str = "labels",
        label_names: list[str] | None = None,
        tokenizer: str | None = None,
        max_length: int = 96,
        max_vocab: int = 2048,
        batch_size: int = 32,
        num_workers: int = 0,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        max_words: int = 64,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if (val is not None or test is not None) and train is None:
            raise ValueError("`val` / `test` files need a `train` file (without one, the embedded corpus is used)")
        self.files = {"train": train, "val": val, "test": test}
        for split, path in self.files.items():
            if path is not None and not os.path.isfile(path):
                raise FileNotFoundError(f"{split} file {path!r} does not exist (.jsonl, .json or .csv)")
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.text_column, self.labels_column = text_column, labels_column
        self.label_names: list[str] | None = list(label_names) if label_names is not None else None
        self.tokenizer_path, self.max_length = tokenizer, int(max_length)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.shuffle, self.seed = shuffle, seed
        self.rows: dict[str, list[dict[str, Any]]] = {}
        self.sets: dict[str, _Encoded] = {}
        self.vocabulary: WordVocabulary | None = None
        self._tokenizer: Any = None

    # -- reading --------------------------------------------------------------------------------
    def _read_file(self, split: str, path: str) -> list[dict[str, Any]]:
        raw = load_records({split: path}, "python")[split]
        rows = []
        for record in raw:
            for column in (self.text_column, self.labels_column):
                if column not in record:
                    raise ValueError(f"{split} file {path!r} has no column {column!r} (columns: {', '.join(record)})")
            rows.append({"text": str(record[self.text_column]), "labels": _label_list(record[self.labels_column])})
        return rows

    def _split(self, rows: list[dict[str, Any]], fractions: Sequence[float]) -> list[list[dict[str, Any]]]:
        """``rows`` cut into held-out parts of the given fractions (from the front) and the rest."""
        parts, start = [], 0
        for fraction in fractions:
            size = int(round(len(rows) * fraction))
            parts.append(rows[start : start + size])
            start += size
        return [*parts, rows[start:]]

    def _read(self) -> dict[str, list[dict[str, Any]]]:
        if self.files["train"] is None:
            rows = embedded_docstrings(self.hparams["max_words"], self.seed)
            val, test, train = self._split(rows, (self.hparams["val_fraction"], self.hparams["test_fraction"]))
            return {"train": train, "val": val, "test": test}
        splits = {split: self._read_file(split, path) for split, path in self.files.items() if path is not None}
        if "val" not in splits:
            rows = splits["train"][:]
            random.Random(self.seed).shuffle(rows)
            splits["val"], splits["train"] = self._split(rows, (self.hparams["val_fraction"],))
        return splits

    def prepare(self) -> None:
        """Read the splits, fix the label order and build the tokenizer (idempotent; ``setup`` calls it)."""
        if self.rows:
            return
        rows = self._read()
        if self.label_names is None:
            self.label_names = sorted({name for row in rows["train"] for name in row["labels"]})
        known = set(self.label_names)
        for split, split_rows in rows.items():
            for row in split_rows:
                unknown = [name for name in row["labels"] if name not in known]
                if unknown:
                    raise ValueError(
                        f"{split} split: label {unknown[0]!r} is not one of the labels {self.label_names} "
                        "(give `label_names` to fix them)"
                    )
        self.rows = rows
        if self.tokenizer_path is None:
            self.vocabulary = WordVocabulary([row["text"] for row in rows["train"]], max_size=self.hparams["max_vocab"])
        else:
            try:
                from transformers import AutoTokenizer
            except ImportError as error:
                raise ImportError(_INSTALL) from error
            self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path, local_files_only=True)

    # -- what the classifier asks for -----------------------------------------------------------
    @property
    def num_labels(self) -> int:
        self.prepare()
        assert self.label_names is not None  # prepare has set them
        return len(self.label_names)

    @property
    def vocab_size(self) -> int:
        """Number of token ids (the encoder's embedding table must hold at least this many)."""
        self.prepare()
        return len(self.vocabulary) if self.vocabulary is not None else len(self._tokenizer)

    @property
    def pad_token_id(self) -> int:
        self.prepare()
        return 0 if self.vocabulary is not None else int(self._tokenizer.pad_token_id or 0)

    def label_counts(self) -> Tensor:
        """Training texts carrying each label, float ``[K]``."""
        self.prepare()
        return self._targets(self.rows["train"]).sum(0)

    def label_token_ids(self) -> list[int]:
        """Token ids of the label names (spaces and underscores between words), for a prompt initialised
        from the labels as the official PTEC code does."""
        self.prepare()
        names = [name.replace("_", " ") for name in self.label_names or []]
        return [token for ids in self.encode(names) for token in ids]

    # -- encoding ----------------------------------------------------------------------------------
    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, cut to ``max_length`` (special tokens included for a tokenizer)."""
        self.prepare()
        if self.vocabulary is not None:
            return [
                [self.vocabulary.index.get(token, 1) for token in self.vocabulary.tokenize(text)][: self.max_length]
                for text in texts
            ]
        return self._tokenizer(list(texts), truncation=True, max_length=self.max_length)["input_ids"]

    def _targets(self, rows: list[dict[str, Any]]) -> Tensor:
        index = {name: i for i, name in enumerate(self.label_names or [])}
        targets = torch.zeros(len(rows), len(index))
        for i, row in enumerate(rows):
            for name in row["labels"]:
                targets[i, index[name]] = 1.0
        return targets

    def setup(self, stage: str | None = None) -> None:
        if self.sets:
            return
        self.prepare()
        for split, rows in self.rows.items():
            self.sets[split] = _Encoded(self.encode([row["text"] for row in rows]), self._targets(rows))

    def collate(self, items: list[tuple[list[int], Tensor]]) -> dict[str, Tensor]:
        """Right-pad a list of ``(ids, targets)`` to the longest text (at least one token)."""
        width = max(1, max(len(ids) for ids, _ in items))
        input_ids = torch.full((len(items), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, (ids, _) in enumerate(items):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        labels = torch.stack([targets for _, targets in items])
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def _loader(self, split: str, train: bool = False) -> DataLoader:
        if split not in self.sets:
            raise ValueError(f"MultiLabelText has no {split} split: give a `{split}` file")
        dataset = self.sets[split]
        sampler = EpochShuffleSampler(dataset, seed=self.seed, shuffle=train and self.shuffle)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, collate_fn=self.collate,
                          num_workers=self.num_workers)  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
