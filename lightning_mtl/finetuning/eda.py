"""EDA text augmentations that need no external lexicon: swap, delete, insert, synonyms from a given table."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

__all__ = ["EDA", "random_deletion", "random_insertion", "random_swap", "synonym_replacement"]

OPERATIONS = ("synonym", "insert", "swap", "delete")


def _count(words: Sequence[str], alpha: float) -> int:
    """Words an operation touches: ``alpha`` of the sentence, at least one (EDA's ``n = max(1, alpha * l)``)."""
    return max(1, int(alpha * len(words)))


def _synonyms_of(word: str, table: Mapping[str, Sequence[str]]) -> list[str]:
    return [s for s in table.get(word.lower(), ()) if s.lower() != word.lower()]


def synonym_replacement(
    words: Sequence[str], n: int, table: Mapping[str, Sequence[str]], rng: random.Random
) -> list[str]:
    """Replace up to ``n`` distinct words that have synonyms in ``table`` (looked up lower-cased) by one of them.

    Every occurrence of a chosen word is replaced by the same synonym, as in EDA. Words without an
    entry are never touched, so a table without any of the sentence's words returns it unchanged.
    """
    out = list(words)
    candidates = sorted({w for w in out if _synonyms_of(w, table)})
    rng.shuffle(candidates)
    for word in candidates[:n]:
        synonym = rng.choice(_synonyms_of(word, table))
        out = [synonym if w == word else w for w in out]
    return out


def random_insertion(words: Sequence[str], n: int, table: Mapping[str, Sequence[str]], rng: random.Random) -> list[str]:
    """Insert ``n`` times, at a random position, a synonym (from ``table``) of a random word of the sentence.

    EDA draws the synonym from WordNet; here it comes from the table, and a sentence none of whose words
    has an entry gets a copy of one of its own words instead (the operation still perturbs the order).
    """
    out = list(words)
    if not out:
        return out
    for _ in range(n):
        pool = [s for w in out for s in _synonyms_of(w, table)]
        word = rng.choice(pool) if pool else rng.choice(out)
        out.insert(rng.randint(0, len(out)), word)
    return out


def random_swap(words: Sequence[str], n: int, rng: random.Random) -> list[str]:
    """Swap the words at two distinct random positions, ``n`` times (a one-word sentence is unchanged)."""
    out = list(words)
    if len(out) < 2:
        return out
    for _ in range(n):
        i, j = rng.sample(range(len(out)), 2)
        out[i], out[j] = out[j], out[i]
    return out


def random_deletion(words: Sequence[str], p: float, rng: random.Random) -> list[str]:
    """Delete each word with probability ``p``; if none is left, keep one random word (as EDA)."""
    kept = [w for w in words if rng.random() >= p]
    if not kept and words:
        return [rng.choice(list(words))]
    return kept


class EDA:
    """Easy data augmentation of a sentence: one of synonym replacement, random insertion, random swap or
    random deletion, chosen at random.

    Wei and Zou, "EDA: Easy Data Augmentation Techniques for Boosting Performance on Text Classification
    Tasks", EMNLP 2019; used with parameter-efficient tuning by Obadinma, Guo and Zhu, "Effectiveness of
    Data Augmentation for Parameter Efficient Tuning with Limited Data", RepL4NLP 2023. EDA looks synonyms up
    in WordNet; here they come from a table the user gives (``{"good": ["fine", "nice"]}``), so nothing is
    downloaded. Words are split on white space and joined with one space.

    An augmented sentence depends only on ``(seed, epoch, index, view)`` (:meth:`augment`), so a DataModule
    draws the same augmentation in every run, in every worker and on every DDP rank, and a new one each epoch.

    Args:
        synonyms: the synonym table (lower-case keys). Without it, replacement is skipped and insertion copies
            a word of the sentence.
        alpha: share of the words changed by replacement, insertion and swap (EDA's default 0.1).
        p_delete: probability of deleting each word (EDA uses ``alpha``; default the same).
        operations: the operations to choose from (``"synonym"``, ``"insert"``, ``"swap"``, ``"delete"``).
        seed: base seed of the draws.
    """

    def __init__(
        self,
        synonyms: Mapping[str, Sequence[str]] | None = None,
        alpha: float = 0.1,
        p_delete: float | None = None,
        operations: Sequence[str] = OPERATIONS,
        seed: int = 0,
    ) -> None:
        unknown = [op for op in operations if op not in OPERATIONS]
        if unknown or not operations:
            raise ValueError(f"EDA operations must be a non-empty subset of {list(OPERATIONS)}, got {list(operations)}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"EDA alpha must lie in [0, 1], got {alpha}")
        self.synonyms = {str(k).lower(): [str(s) for s in v] for k, v in (synonyms or {}).items()}
        self.alpha = float(alpha)
        self.p_delete = float(alpha if p_delete is None else p_delete)
        if not 0.0 <= self.p_delete <= 1.0:
            raise ValueError(f"EDA p_delete must lie in [0, 1], got {self.p_delete}")
        # without a table, synonym replacement would be the identity: leave it out of the draw
        self.operations = tuple(op for op in operations if op != "synonym" or self.synonyms) or ("swap",)
        self.seed = int(seed)

    def apply(self, text: str, operation: str, rng: random.Random) -> str:
        """``text`` changed by ``operation`` with the draws of ``rng``."""
        words = text.split()
        n = _count(words, self.alpha)
        if operation == "synonym":
            out = synonym_replacement(words, n, self.synonyms, rng)
        elif operation == "insert":
            out = random_insertion(words, n, self.synonyms, rng)
        elif operation == "swap":
            out = random_swap(words, n, rng)
        elif operation == "delete":
            out = random_deletion(words, self.p_delete, rng)
        else:
            raise ValueError(f"unknown EDA operation {operation!r}; choose from {list(OPERATIONS)}")
        return " ".join(out)

    def augment(self, text: str, epoch: int, index: int, view: int = 1) -> str:
        """The augmented ``text`` for sample ``index``'s ``view``-th copy in ``epoch``."""
        # a string seed is hashed with SHA-512 by `random`: the same in every process, whatever PYTHONHASHSEED
        rng = random.Random(f"eda:{self.seed}:{epoch}:{index}:{view}")
        return self.apply(text, rng.choice(self.operations), rng)

    def __repr__(self) -> str:
        return f"EDA(alpha={self.alpha}, p_delete={self.p_delete}, operations={list(self.operations)})"
