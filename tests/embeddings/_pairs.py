"""Pre-tokenised pair batches for the bi-encoder tests (no tokenizer needed)."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from tests.embeddings._models import token_batch


class TokenPairs(Dataset):
    """``n`` (anchor, positive, ``k`` hard negatives, domain) samples of random token ids (vocabulary 64)."""

    def __init__(self, n: int = 16, length: int = 6, k: int = 0, domains: int = 3, seed: int = 0) -> None:
        self.anchor = token_batch(n, length, seed)
        self.positive = token_batch(n, length, seed + 1)
        self.negative = token_batch(n * k, length, seed + 2) if k else None
        self.k, self.domain = k, torch.arange(n) % domains

    def __len__(self) -> int:
        return len(self.domain)

    def __getitem__(self, i: int) -> dict:
        item = {"anchor": {"input_ids": self.anchor[0][i], "attention_mask": self.anchor[1][i]},
                "positive": {"input_ids": self.positive[0][i], "attention_mask": self.positive[1][i]},
                "domain": self.domain[i]}  # fmt: skip
        if self.negative is not None:
            rows = slice(i * self.k, (i + 1) * self.k)
            item["negative"] = {"input_ids": self.negative[0][rows], "attention_mask": self.negative[1][rows]}
        return item
