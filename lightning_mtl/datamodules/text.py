"""Multi-task text classification / regression from local files (Hugging Face ``datasets`` or plain Python)."""

from __future__ import annotations

import csv
import json
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_mtl._constants import MISSING_LABEL
from lightning_mtl.datamodules._common import TensorMultiTaskDataset, _TensorDataModule, check_data_path

__all__ = ["TextMultiTask", "WordVocabulary", "load_records"]

_SPLITS = ("train", "val", "test")
_DATASETS_HINT = (
    "TextMultiTask(engine='datasets') needs the optional `datasets` package: pip install \"lightning-mtl[text]\""
)
_TOKEN = re.compile(r"\w+|[^\w\s]")
PAD, UNKNOWN = 0, 1


def _read_python(path: str) -> list[dict]:
    """Rows of a ``.jsonl`` / ``.json`` (a list of objects) or ``.csv`` file with the standard library."""
    if path.endswith(".jsonl"):
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    if path.endswith(".json"):
        with open(path) as f:
            rows = json.load(f)
        if not isinstance(rows, list):
            raise ValueError(f"{path}: expected a JSON list of objects (or use .jsonl, one object per line)")
        return rows
    if path.endswith(".csv"):
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    raise ValueError(f"{path}: unsupported file type; use .jsonl, .json or .csv")


def load_records(files: Mapping[str, str], engine: str) -> dict[str, list[dict]]:
    """Rows of every split. ``engine="datasets"`` reads through ``datasets.load_dataset`` (local files only,
    imported lazily); ``"python"`` with the standard library."""
    if engine == "python":
        return {split: _read_python(path) for split, path in files.items()}
    if engine != "datasets":
        raise ValueError(f"engine must be 'datasets' or 'python', got {engine!r}")
    try:
        import datasets
    except ImportError as error:
        raise ImportError(_DATASETS_HINT) from error
    suffix = os.path.splitext(next(iter(files.values())))[1].lstrip(".")
    builder = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet", "txt": "text"}.get(suffix)
    if builder is None:
        raise ValueError(f"cannot read .{suffix} files with datasets; use .jsonl, .json, .csv or .parquet")
    loaded = datasets.load_dataset(builder, data_files=dict(files))
    return {split: loaded[split].to_list() for split in files}


class WordVocabulary:
    """A word-level vocabulary (the built-in tokenizer): lower-cased words and punctuation; id 0 pads and id 1
    stands for words outside the vocabulary.

    Args:
        texts: the training texts.
        max_size: keep the most frequent words (ties by first appearance) up to this many ids in total.
        min_count: drop words seen fewer times.
    """

    def __init__(self, texts: Sequence[str], max_size: int = 30000, min_count: int = 1) -> None:
        counts = Counter(token for text in texts for token in self.tokenize(text))
        words = [w for w, c in counts.most_common() if c >= min_count][: max(max_size - 2, 0)]
        self.index = {w: i + 2 for i, w in enumerate(words)}

    @staticmethod
    def tokenize(text: str) -> list[str]:
        return _TOKEN.findall(str(text).lower())

    def __len__(self) -> int:
        return len(self.index) + 2

    def encode(self, texts: Sequence[str], max_length: int) -> Tensor:
        ids = torch.full((len(texts), max_length), PAD, dtype=torch.long)
        for row, text in enumerate(texts):
            tokens = [self.index.get(t, UNKNOWN) for t in self.tokenize(text)][:max_length]
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        return ids


class TextMultiTask(_TensorDataModule):
    """Several labels per text (e.g. topic and sentiment), one task each, from local files.

    Collobert and Weston, "A Unified Architecture for Natural Language Processing: Deep Neural Networks
    with Multitask Learning", ICML 2008, share one text encoder across tasks; this module feeds such a
    model. Files (``train`` required; ``val`` / ``test`` optional, else they are empty) are JSON lines,
    JSON or CSV (Parquet with ``datasets``) with a text column and one column per task. Read through
    Hugging Face ``datasets`` (``engine="datasets"``, the optional extra) or the standard library
    (``engine="python"``).

    Tokens: with ``tokenizer`` (a local folder for ``transformers.AutoTokenizer``, extra) ids come from it;
    otherwise from a :class:`WordVocabulary` built on the training texts. Ids are padded / cut to
    ``max_length`` with pad id 0 (the built-in vocabulary) or the tokenizer's.

    Labels: a task is a classification task when its training values are whole numbers or strings (classes
    = sorted distinct values, see :attr:`classes`), else regression; a missing value (``null`` / empty) is a
    missing label.

    Batches: ``(ids long [B, max_length], {task: long [B] or float [B]})``.

    Args:
        train: path of the training file.
        tasks: label columns (task names).
        val: path of the validation file.
        test: path of the test file.
        text_column: column with the text.
        engine: ``"datasets"`` or ``"python"``.
        tokenizer: local folder of a ``transformers`` tokenizer (default: built-in word vocabulary).
        max_length: tokens per text.
        max_vocab: size of the built-in vocabulary.
        batch_size: texts per batch.
        num_workers: DataLoader workers.
        seed: seed of the training order.
        pin_memory: forwarded to the DataLoaders.
    """

    def __init__(
        self,
        train: str,
        tasks: list[str],
        val: str | None = None,
        test: str | None = None,
        text_column: str = "text",
        engine: Literal["datasets", "python"] = "datasets",
        tokenizer: str | None = None,
        max_length: int = 128,
        max_vocab: int = 30000,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed, pin_memory=pin_memory)
        if not tasks or any(not t.isidentifier() for t in tasks):
            raise ValueError(
                f"tasks must be a non-empty list of label columns that are Python identifiers, got {tasks}"
            )
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.save_hyperparameters()
        self.files = {s: p for s, p in zip(_SPLITS, (train, val, test)) if p is not None}
        self.tasks, self.text_column, self.engine = list(tasks), text_column, engine
        self.tokenizer_path, self.max_length, self.max_vocab = tokenizer, int(max_length), int(max_vocab)
        self.classes: dict[str, list] = {}
        self.vocabulary: WordVocabulary | None = None
        self._records: dict[str, list[dict]] | None = None

    def _rows(self) -> dict[str, list[dict]]:
        if self._records is None:
            for split, path in self.files.items():
                check_data_path(path, "TextMultiTask", f"expected the {split} file (.jsonl, .json or .csv)")
            self._records = load_records(self.files, self.engine)
            columns = [self.text_column, *self.tasks]
            for split, rows in self._records.items():
                absent = [c for c in columns if rows and c not in rows[0]]
                if absent:
                    raise ValueError(f"{self.files[split]} has no column(s) {absent}; it has: {', '.join(rows[0])}")
            self._infer_labels()
        return self._records

    def _infer_labels(self) -> None:
        assert self._records is not None  # called by _rows right after it loads the records
        train = self._records["train"]
        for task in self.tasks:
            values = [r[task] for r in train if r[task] not in (None, "")]
            if all(_whole(v) for v in values) or any(isinstance(v, str) and not _number(v) for v in values):
                self.classes[task] = sorted({_normal(v) for v in values}, key=lambda v: (isinstance(v, str), v))

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(self.tasks)

    @property
    def num_classes(self) -> dict[str, int]:
        self._rows()
        return {t: len(self.classes[t]) if t in self.classes else 1 for t in self.tasks}

    @property
    def input_shape(self) -> tuple[int]:
        return (self.max_length,)

    @property
    def vocab_size(self) -> int:
        """Number of token ids (size of an embedding table)."""
        if self.tokenizer_path is not None:
            return len(self._tokenizer())
        self._build_vocabulary()
        assert self.vocabulary is not None  # _build_vocabulary has just set it
        return len(self.vocabulary)

    def _tokenizer(self) -> Any:
        try:
            from transformers import AutoTokenizer
        except ImportError as error:
            raise ImportError("TextMultiTask(tokenizer=...) needs the optional `transformers` package") from error
        return AutoTokenizer.from_pretrained(self.tokenizer_path, local_files_only=True)

    def _build_vocabulary(self) -> None:
        if self.vocabulary is None:
            texts = [str(r[self.text_column]) for r in self._rows()["train"]]
            self.vocabulary = WordVocabulary(texts, max_size=self.max_vocab)

    def _encode(self, texts: list[str]) -> Tensor:
        if self.tokenizer_path is None:
            self._build_vocabulary()
            assert self.vocabulary is not None  # _build_vocabulary has just set it
            return self.vocabulary.encode(texts, self.max_length)
        out = self._tokenizer()(texts, padding="max_length", truncation=True, max_length=self.max_length,
                                return_tensors="pt")  # fmt: skip
        return out["input_ids"]

    def _labels(self, task: str, rows: list[dict]) -> Tensor:
        if task in self.classes:
            index = {v: i for i, v in enumerate(self.classes[task])}
            labels = []
            for r in rows:
                v = r[task]
                if v in (None, ""):
                    labels.append(MISSING_LABEL)
                elif _normal(v) not in index:
                    raise ValueError(f"task {task!r}: label {v!r} does not occur in the training file")
                else:
                    labels.append(index[_normal(v)])
            return torch.tensor(labels, dtype=torch.long)
        return torch.tensor([float("nan") if r[task] in (None, "") else float(r[task]) for r in rows])

    def _build(self) -> None:
        records = self._rows()
        sets = {}
        for split in _SPLITS:
            rows = records.get(split, [])
            texts = [str(r[self.text_column]) for r in rows]
            ids = self._encode(texts) if rows else torch.zeros(0, self.max_length, dtype=torch.long)
            sets[split] = TensorMultiTaskDataset(ids, {t: self._labels(t, rows) for t in self.tasks})
        self.train_set, self.val_set, self.test_set = sets["train"], sets["val"], sets["test"]


def _number(v: object) -> bool:
    try:
        float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return True


def _whole(v: object) -> bool:
    if isinstance(v, bool):
        return True
    if isinstance(v, int):
        return True
    return isinstance(v, str) and v.strip().lstrip("-").isdigit()


def _normal(v: object) -> object:
    """CSV cells are strings: ``"3"`` and ``3`` are the same class."""
    if isinstance(v, str) and v.strip().lstrip("-").isdigit():
        return int(v)
    return v
