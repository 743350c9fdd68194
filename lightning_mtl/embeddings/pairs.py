"""Text pairs (anchor, positive, optional hard negatives, optional domain) from local files, tokenised in the
data-loader workers with dynamic padding."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_mtl._resume import ResumableBatches
from lightning_mtl.datamodules.text import load_records
from lightning_mtl.embeddings.buckets import LengthBucketSampler
from lightning_mtl.embeddings.embedded import DOMAINS, embedded_pairs

__all__ = ["PairCollate", "PairsDataModule", "read_rows", "train_wordpiece"]

_INSTALL = "PairsDataModule needs the optional `transformers` package: pip install 'lightning-mtl[embeddings]'"
_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def read_rows(path: str, split: str = "train") -> list[dict[str, Any]]:
    """Rows of a ``.jsonl`` / ``.json`` (list of objects) / ``.csv`` file, ``.parquet`` through ``datasets``, or a
    folder written by ``datasets``' ``save_to_disk`` (a ``Dataset``, or a ``DatasetDict`` whose ``split`` is read)."""
    if os.path.isdir(path):
        try:
            import datasets
        except ImportError as error:
            raise ImportError(f"reading the saved datasets folder {path!r} needs `pip install datasets`") from error
        saved = datasets.load_from_disk(path)
        if isinstance(saved, datasets.DatasetDict):
            if split not in saved:
                raise ValueError(f"the saved DatasetDict {path!r} has no split {split!r}; it has {sorted(saved)}")
            saved = saved[split]
        return saved.to_list()
    return load_records({"rows": path}, "datasets" if path.endswith(".parquet") else "python")["rows"]


def train_wordpiece(texts: Sequence[str], vocab_size: int = 2048) -> Any:
    """A lower-casing WordPiece tokenizer built from ``texts`` (``[PAD]`` = 0, ``[CLS]`` / ``[SEP]`` around each
    text), as a ``transformers`` fast tokenizer; nothing is downloaded.

    The vocabulary is the special tokens, every character seen (alone and as a ``##`` continuation), then
    the most frequent words (ties broken alphabetically) up to ``vocab_size``: the same texts always give
    the same vocabulary, so a resumed run that builds its tokenizer again reads its weights against the
    same token ids (the ``tokenizers`` WordPiece trainer breaks ties differently from run to run).

    Raises:
        ValueError: ``vocab_size`` cannot hold the special tokens and the characters of ``texts``.
    """
    try:
        import tokenizers
        from tokenizers import decoders, models, normalizers, pre_tokenizers, processors
        from transformers import PreTrainedTokenizerFast
    except ImportError as error:
        raise ImportError(_INSTALL) from error
    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter(
        word for text in texts for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))
    )
    chars = sorted({c for word in counts for c in word})
    alphabet = [*_SPECIALS, *chars, *(f"##{c}" for c in chars)]
    if len(alphabet) > vocab_size:
        raise ValueError(
            f"vocab_size={vocab_size} cannot hold the {len(_SPECIALS)} special tokens and the {len(chars)} characters "
            f"of the texts (with their ## continuations): give vocab_size >= {len(alphabet)}"
        )
    words = [w for w, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0])) if len(w) > 1]
    tokens = alphabet + words[: vocab_size - len(alphabet)]
    tokenizer = tokenizers.Tokenizer(models.WordPiece({t: i for i, t in enumerate(tokens)}, unk_token="[UNK]"))
    tokenizer.normalizer, tokenizer.pre_tokenizer = normalizer, pre_tokenizer
    tokenizer.decoder = decoders.WordPiece()
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")  # fmt: skip


class PairCollate:
    """Tokenise a list of pair rows into a :class:`~lightning_mtl.embeddings.BiEncoder` batch (runs in the
    data-loader workers; padding to the longest text of the batch).

    Rows are sorted by domain (stably) so that enforced routing finds each expert's samples contiguous;
    in-batch-negative losses do not depend on the order of the rows.

    Args:
        tokenizer: a ``transformers`` tokenizer.
        max_length: truncation length in tokens.
    """

    def __init__(self, tokenizer: Any, max_length: int = 128) -> None:
        self.tokenizer, self.max_length = tokenizer, max_length

    def _tokens(self, texts: list[str]) -> dict[str, Tensor]:
        out = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        if "domain" in rows[0]:
            rows = sorted(rows, key=lambda row: row["domain"])
        batch: dict[str, Any] = {
            "anchor": self._tokens([row["anchor"] for row in rows]),
            "positive": self._tokens([row["positive"] for row in rows]),
        }
        if "negative" in rows[0]:
            k = len(rows[0]["negative"])
            tokens = self._tokens([text for row in rows for text in row["negative"]])
            batch["negative"] = {key: value.view(len(rows), k, -1) for key, value in tokens.items()}
        if "domain" in rows[0]:
            batch["domain"] = torch.tensor([row["domain"] for row in rows])
        if "score" in rows[0]:  # teacher scores (distillation): one float, or one per class
            batch["score"] = torch.tensor([row["score"] for row in rows], dtype=torch.float32)
        if "label" in rows[0]:
            batch["label"] = torch.tensor([int(row["label"]) for row in rows])
        return batch


class PairsDataModule(ResumableBatches, pl.LightningDataModule):
    """Text pairs (anchor, positive, optional hard negatives, optional domain) for a
    :class:`~lightning_mtl.embeddings.BiEncoder`.

    Files are ``.jsonl`` / ``.json`` / ``.csv`` (or ``.parquet`` through ``datasets``), or folders written by
    ``datasets``' ``save_to_disk`` (a ``Dataset``, or a ``DatasetDict`` read at the split's name). Without ``train``, the
    embedded corpus of :func:`~lightning_mtl.embeddings.embedded_pairs` (three domains built from Python's own
    docstrings and templates) is split into train / val. Hard negatives: a list of texts per row in json
    (the same count in every row), one text in csv. Domains: names or ints, mapped to expert ids by
    ``domains`` (default: sorted names of the training split; the embedded corpus: functions, classes,
    paraphrases).

    The training order depends on ``(seed, epoch)`` only (:class:`~lightning_mtl.embeddings.LengthBucketSampler`);
    with ``length_bucketing`` each batch gathers pairs of similar token length (less padding). Under DDP each
    rank trains on its own share of every global batch. A run resumed from a checkpoint saved inside an epoch
    continues with the batches the uninterrupted run saw next (the data module keeps its place in its
    ``state_dict``).

    Args:
        train: training pairs file (``None``: the embedded corpus).
        val: validation pairs file (embedded corpus: ``val_fraction`` of it).
        test: test pairs file.
        tokenizer: local tokenizer folder (``AutoTokenizer``; nothing is downloaded); ``None``: a WordPiece
            vocabulary of ``vocab_size`` trained on the training texts.
        vocab_size: size of that trained vocabulary (the model's ``vocab_size`` must be at least this).
        columns: file column of each field: ``{"anchor": ..., "positive": ..., "negative": ..., "domain": ...,
            "score": ..., "label": ...}`` (defaults: the field names; all but ``anchor`` and ``positive`` are
            used when present; ``score`` is a teacher's pair score for distillation).
        domains: domain names in expert-id order.
        max_length: truncation length in tokens.
        batch_size: pairs per batch (per rank under DDP).
        num_workers: data-loader workers (tokenisation happens there).
        per_domain: cap per domain of the embedded corpus.
        val_fraction: share of the embedded corpus held out for validation.
        seed: shuffles the embedded corpus and the training batches.
        length_bucketing: batch pairs of similar token length (anchor + positive + hard negatives).
        bucket_pool: global batches per pool sorted by length (see :class:`LengthBucketSampler`).
        train_domains: the training loader yields only these domains' pairs (one expert per domain, to be
            merged); the vocabulary is still trained on every training text, so experts share token ids.
        probe_per_domain: the training loader yields the first this many pairs of each domain (of the
            training split's seeded order): a task-balanced probe set (Self Positioning); a domain with fewer
            pairs is an error.
    """

    def __init__(
        self,
        train: str | None = None,
        val: str | None = None,
        test: str | None = None,
        tokenizer: str | None = None,
        vocab_size: int = 2048,
        columns: dict[str, str] | None = None,
        domains: list[str] | None = None,
        max_length: int = 128,
        batch_size: int = 16,
        num_workers: int = 0,
        per_domain: int = 300,
        val_fraction: float = 0.1,
        seed: int = 0,
        length_bucketing: bool = False,
        bucket_pool: int = 32,
        train_domains: list[str] | None = None,
        probe_per_domain: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if bucket_pool < 1:
            raise ValueError(f"bucket_pool must be at least 1 global batch, got {bucket_pool}")
        if probe_per_domain is not None and probe_per_domain < 1:
            raise ValueError(f"probe_per_domain must be a positive number of pairs, got {probe_per_domain}")
        fields = ("anchor", "positive", "negative", "domain", "score", "label")
        unknown = set(columns or {}) - set(fields)
        if unknown:
            raise ValueError(f"unknown pair field(s) {sorted(unknown)}: columns maps {', '.join(fields)}")
        self.columns = {field: field for field in fields}
        self.columns.update(columns or {})
        self.files = {"train": train, "val": val, "test": test}
        for split, path in self.files.items():
            if path is not None and not os.path.exists(path):
                raise FileNotFoundError(f"{split} pairs file or saved datasets folder {path!r} does not exist")
        self.domain_names: list[str] | None = list(domains) if domains is not None else None
        self.splits: dict[str, list[dict[str, Any]]] = {}
        self.tokenizer: Any = None
        self.sampler: LengthBucketSampler | None = None
        self._epoch, self._consumed, self._resume = 0, 0, None  # ResumableBatches' bookkeeping

    def _read(self) -> dict[str, list[dict[str, Any]]]:
        if self.files["train"] is None:
            rows = embedded_pairs(self.hparams["per_domain"], self.hparams["seed"])
            cut = int(round(len(rows) * self.hparams["val_fraction"]))
            if self.domain_names is None:
                self.domain_names = list(DOMAINS)
            return {"train": rows[cut:], "val": rows[:cut]}
        return {split: [self._row(raw, path) for raw in read_rows(path, split)]
                for split, path in self.files.items() if path is not None}  # fmt: skip

    def _row(self, raw: dict[str, Any], path: str) -> dict[str, Any]:
        row = {}
        for field, column in self.columns.items():
            if column in raw and raw[column] not in (None, ""):
                row[field] = raw[column]
            elif field in ("anchor", "positive"):
                raise ValueError(f"pairs file {path!r} has no column {column!r} (columns: {', '.join(raw)})")
        if "negative" in row and isinstance(row["negative"], str):
            row["negative"] = [row["negative"]]
        if isinstance(row.get("score"), str):  # csv cells are text
            row["score"] = float(row["score"])
        return row

    def setup(self, stage: str) -> None:
        if self.splits:
            return
        splits = self._read()
        train = splits.get("train", [])
        if self.domain_names is None and train and "domain" in train[0]:
            self.domain_names = sorted({str(row["domain"]) for row in train})
        for rows in splits.values():
            self._check(rows)
        self.splits = splits
        if self.tokenizer is None:
            self.tokenizer = self._tokenizer(train)

    def _check(self, rows: list[dict[str, Any]]) -> None:
        counts = {len(row.get("negative", [])) for row in rows}
        if len(counts) > 1:
            raise ValueError(f"every row needs the same number of hard negatives, found {sorted(counts)}")
        names = {name: i for i, name in enumerate(self.domain_names or [])}
        for row in rows:
            if "domain" not in row:
                continue
            if str(row["domain"]) not in names:
                raise ValueError(f"domain {row['domain']!r} is not among the domains {self.domain_names}")
            row["domain"] = names[str(row["domain"])]

    def _tokenizer(self, train: list[dict[str, Any]]) -> Any:
        path = self.hparams["tokenizer"]
        if path is None:
            texts = [text for row in train for text in (row["anchor"], row["positive"], *row.get("negative", []))]
            return train_wordpiece(texts, self.hparams["vocab_size"])
        if not os.path.isdir(path):
            raise FileNotFoundError(f"tokenizer folder {path!r} does not exist (nothing is downloaded)")
        try:
            from transformers import AutoTokenizer
        except ImportError as error:
            raise ImportError(_INSTALL) from error
        return AutoTokenizer.from_pretrained(path, local_files_only=True)

    def rows(self, split: str) -> list[dict[str, Any]]:
        """The rows of a split (domains as expert ids), after ``setup``."""
        if split not in self.splits:
            raise ValueError(f"no {split} pairs: give `{split}` (or leave `train` empty for the embedded corpus)")
        return self.splits[split]

    def loader_rows(self, split: str) -> list[dict[str, Any]]:
        """The rows a split's loader yields (:meth:`rows`; a subclass may yield more than it evaluates on)."""
        return self.rows(split)

    def _train_rows(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The training rows after ``train_domains`` and ``probe_per_domain``."""
        wanted, per_domain = self.hparams.get("train_domains"), self.hparams.get("probe_per_domain")
        if wanted is None and per_domain is None:
            return rows
        names = self.domain_names or []
        if any("domain" not in row for row in rows):
            raise ValueError("train_domains / probe_per_domain need a domain per training pair: give a domain column")
        unknown = [name for name in wanted or [] if name not in names]
        if unknown:
            raise ValueError(f"train_domains names {unknown[0]!r}, which is not among the domains {names}")
        keep = [names.index(name) for name in wanted] if wanted is not None else list(range(len(names)))
        picked: dict[int, list[dict[str, Any]]] = {d: [] for d in keep}
        for row in rows:
            if row["domain"] in picked:
                picked[row["domain"]].append(row)
        if per_domain is not None:
            short = [names[d] for d, found in picked.items() if len(found) < per_domain]
            if short:
                raise ValueError(f"domain {short[0]!r} has fewer than probe_per_domain={per_domain} training pairs")
            picked = {d: found[:per_domain] for d, found in picked.items()}
        chosen = {id(row) for found in picked.values() for row in found}
        return [row for row in rows if id(row) in chosen]  # the split's own order, shuffled by the sampler

    def token_lengths(self, rows: list[dict[str, Any]]) -> list[int]:
        """Tokens of each row (anchor + positive + hard negatives, each truncated at ``max_length``): what
        length bucketing sorts by."""
        texts = [[row["anchor"], row["positive"], *row.get("negative", [])] for row in rows]
        flat = [text for row in texts for text in row]
        ids = self.tokenizer(flat, truncation=True, max_length=self.hparams["max_length"])["input_ids"]
        out, at = [], 0
        for row in texts:
            out.append(sum(len(i) for i in ids[at : at + len(row)]))
            at += len(row)
        return out

    def _loader(
        self, split: str, sampler: LengthBucketSampler | None = None, rows: list[dict[str, Any]] | None = None
    ) -> DataLoader:
        rows = self.loader_rows(split) if rows is None else rows
        return DataLoader(rows, batch_size=self.hparams["batch_size"],  # type: ignore[arg-type]
                          sampler=sampler, num_workers=self.hparams["num_workers"],
                          collate_fn=PairCollate(self.tokenizer, self.hparams["max_length"]))  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        rows = self._train_rows(self.loader_rows("train"))
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        lengths = self.token_lengths(rows) if self.hparams["length_bucketing"] else None
        # the order depends on (seed, epoch) only, so a run resumed at an epoch sees the uninterrupted order
        self.sampler = LengthBucketSampler(len(rows), self.hparams["batch_size"], lengths, self.hparams["bucket_pool"],
                                           self.hparams["seed"], rank, world)  # fmt: skip
        self._resume_sampler(self.sampler)
        return self._loader("train", self.sampler, rows)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")


def truncation_length(trainer: Any, max_length: int | None) -> int:
    """``max_length`` where given, else the data module's own truncation length (128 without one): an evaluation
    callback then encodes texts as the training batches were, and never past the model's positions."""
    if max_length is not None:
        return int(max_length)
    hparams = getattr(getattr(trainer, "datamodule", None), "hparams", None) or {}
    return int(hparams.get("max_length", 128))
