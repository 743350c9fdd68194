"""An offline text corpus built from the Python standard library's own source: code, prose and noise."""

from __future__ import annotations

import ast
import importlib.util
import random
import textwrap

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["StdlibCorpus"]

# pure-Python modules present in every supported CPython; the target's functions come from the first group
TARGET_MODULES = ("json.decoder", "json.encoder", "base64", "bisect", "copy", "fnmatch", "glob", "queue",
                  "random", "sched", "shutil", "tempfile", "colorsys", "heapq")  # fmt: skip
POOL_MODULES = ("argparse", "calendar", "configparser", "csv", "difflib", "fractions", "ftplib", "inspect",
                "ipaddress", "pathlib", "pprint", "shlex", "statistics", "string", "tarfile", "textwrap",
                "zipfile", "email.message", "http.client", "urllib.parse", "logging", "dataclasses", "enum",
                "functools", "typing", "collections", "smtplib", "imaplib", "gettext", "locale")  # fmt: skip
KINDS = ("code", "prose", "random")
PAD = 256  # the byte vocabulary is 0..255; one more id pads short texts


def _module_source(name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        return ""  # absent or compiled on this interpreter: the corpus uses the other modules
    with open(spec.origin, encoding="utf-8") as f:
        return f.read()


def _functions_and_docstrings(modules: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """Every function's source (dedented) and every docstring of the modules, in file order."""
    code, prose = [], []
    for name in modules:
        source = _module_source(name)
        if not source:
            continue
        lines = source.splitlines(keepends=True)  # once per file: ast.get_source_segment re-splits per call
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno is not None:
                code.append(textwrap.dedent("".join(lines[node.lineno - 1 : node.end_lineno])))
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc:
                    prose.append(doc)
    return code, prose


def _random_text(rng: random.Random, length: int) -> str:
    words: list[str] = []
    while sum(len(w) + 1 for w in words) < length:
        words.append("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))))
    return " ".join(words)


def _encode(text: str, seq_len: int) -> torch.Tensor:
    data = list(text.encode("utf-8")[: seq_len + 1])
    return torch.tensor(data + [PAD] * (seq_len + 1 - len(data)), dtype=torch.long)


class _Texts(Dataset):
    def __init__(self, texts: list[str], seq_len: int) -> None:
        self.texts, self.seq_len = texts, seq_len

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> dict:
        return {"text": self.texts[index], "tokens": _encode(self.texts[index], self.seq_len)}


class StdlibCorpus(pl.LightningDataModule):
    """ZIP-FIT's offline recipe data: a target set of functions and a mixed source pool, from CPython's stdlib.

    Built from the ``.py`` files of the running interpreter (nothing downloads). The target is functions of
    one group of modules (``target_texts`` for selection; a disjoint held-out set of them is the validation
    set, whose loss is the target loss); the training pool mixes functions of other modules (``"code"``),
    docstrings (``"prose"``) and seeded random words (``"random"``), ``per_kind`` of each, shuffled.
    ``train_kinds`` labels every training text. Items are ``{"text": str, "tokens": LongTensor}``, the
    tokens being the first ``seq_len + 1`` UTF-8 bytes, padded with 256.

    Args:
        per_kind: training texts of each kind.
        num_targets: target functions used to score the pool.
        num_val: held-out target functions for the validation (target) loss.
        min_chars: shortest text kept (shorter functions and docstrings carry little signal).
        max_chars: longest text kept.
        seq_len: bytes per training sequence.
        batch_size: batch size of every loader.
        seed: seed of the sampling, the shuffling and the random texts.
    """

    def __init__(self, per_kind: int = 200, num_targets: int = 30, num_val: int = 60, min_chars: int = 200,
                 max_chars: int = 1500, seq_len: int = 256, batch_size: int = 16, seed: int = 0) -> None:  # fmt: skip
        super().__init__()
        self.per_kind, self.num_targets, self.num_val = per_kind, num_targets, num_val
        self.min_chars, self.max_chars, self.seq_len = min_chars, max_chars, seq_len
        self.batch_size, self.seed = batch_size, seed
        self.train_texts: list[str] = []
        self.train_kinds: list[str] = []
        self.target_texts: list[str] = []
        self.val_texts: list[str] = []

    def setup(self, stage: str) -> None:
        if self.train_texts:
            return
        rng = random.Random(self.seed)

        def keep(text: str) -> bool:
            return self.min_chars <= len(text) <= self.max_chars

        targets = [t for t in _functions_and_docstrings(TARGET_MODULES)[0] if keep(t)]
        code, prose = (list(filter(keep, group)) for group in _functions_and_docstrings(POOL_MODULES))
        need = self.num_targets + self.num_val
        if len(targets) < need or min(len(code), len(prose)) < self.per_kind:
            raise ValueError(
                f"this interpreter's stdlib gives {len(targets)} target functions, {len(code)} pool functions and "
                f"{len(prose)} docstrings within {self.min_chars}..{self.max_chars} characters; lower num_targets + "
                f"num_val ({need}) or per_kind ({self.per_kind})"
            )
        rng.shuffle(targets)
        self.target_texts, self.val_texts = targets[: self.num_targets], targets[self.num_targets : need]
        noise = [_random_text(rng, rng.randint(self.min_chars, self.max_chars)) for _ in range(self.per_kind)]
        pool = [(t, kind) for kind, group in zip(KINDS, (code, prose, noise)) for t in rng.sample(group, self.per_kind)]
        rng.shuffle(pool)
        self.train_texts = [t for t, _ in pool]
        self.train_kinds = [kind for _, kind in pool]

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(_Texts(self.train_texts, self.seq_len), self.batch_size, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_Texts(self.val_texts, self.seq_len), self.batch_size)
