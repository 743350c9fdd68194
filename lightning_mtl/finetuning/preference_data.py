"""Preference pairs (prompt, chosen answer, rejected answer) as token ids, for SFT and DPO."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_mtl.datamodules import EpochShuffleSampler, check_data_path
from lightning_mtl.finetuning.losses import IGNORE_INDEX

__all__ = ["PreferencePairs", "collate_pairs", "encode_pair", "synthetic_pairs"]

Pair = dict[str, list[int]]


def encode_pair(prompt: Sequence[int], answer: Sequence[int]) -> tuple[Tensor, Tensor]:
    """``input_ids`` = prompt + answer and ``labels`` = -100 on the prompt, the answer tokens after it."""
    ids = torch.tensor([*prompt, *answer], dtype=torch.long)
    labels = ids.clone()
    labels[: len(prompt)] = IGNORE_INDEX
    return ids, labels


def _pad(rows: list[Tensor], length: int, value: int) -> Tensor:
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def collate_pairs(items: list[dict[str, Tensor]], pad_token_id: int = 0) -> dict[str, Tensor]:
    """Right-pad chosen and rejected sequences to one common length (DPO runs them as one batch).

    Returns ``chosen_input_ids``, ``chosen_labels``, ``chosen_attention_mask`` and the same for
    ``rejected``, each ``[B, L]``.
    """
    length = max(len(item[f"{side}_input_ids"]) for item in items for side in ("chosen", "rejected"))
    batch = {}
    for side in ("chosen", "rejected"):
        ids = [item[f"{side}_input_ids"] for item in items]
        batch[f"{side}_input_ids"] = _pad(ids, length, pad_token_id)
        batch[f"{side}_labels"] = _pad([item[f"{side}_labels"] for item in items], length, IGNORE_INDEX)
        batch[f"{side}_attention_mask"] = _pad([torch.ones_like(i) for i in ids], length, 0)
    return batch


def synthetic_pairs(num: int, vocab_size: int, prompt_length: int, answer_length: int, seed: int) -> list[Pair]:
    """The embedded task: the chosen answer copies the prompt's first ``answer_length`` tokens, the rejected
    answer is other random tokens (token 0 is kept for padding)."""
    if answer_length > prompt_length or vocab_size < 3:
        raise ValueError("synthetic pairs need answer_length <= prompt_length and vocab_size >= 3")
    generator = torch.Generator().manual_seed(seed)
    prompts = torch.randint(1, vocab_size, (num, prompt_length), generator=generator)
    chosen = prompts[:, :answer_length]
    # a shift in 1..vocab-2 inside the non-pad ids: never the chosen token, never the pad id
    shift = torch.randint(1, vocab_size - 1, chosen.shape, generator=generator)
    rejected = (chosen - 1 + shift) % (vocab_size - 1) + 1
    return [{"prompt": p.tolist(), "chosen": c.tolist(), "rejected": r.tolist()}
            for p, c, r in zip(prompts, chosen, rejected)]  # fmt: skip


def _read_jsonl(path: str) -> list[Pair]:
    check_data_path(
        path, "PreferencePairs", "give a .jsonl file with one {prompt, chosen, rejected} (token ids) per line"
    )
    pairs = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            missing = {"prompt", "chosen", "rejected"} - set(row)
            if missing:
                raise ValueError(f"line {number} of '{path}' lacks {sorted(missing)} (token id lists)")
            pairs.append({k: [int(t) for t in row[k]] for k in ("prompt", "chosen", "rejected")})
    return pairs


class _PairDataset(torch.utils.data.Dataset):
    def __init__(self, pairs: list[Pair]) -> None:
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        pair = self.pairs[index]
        item = {}
        for side in ("chosen", "rejected"):
            item[f"{side}_input_ids"], item[f"{side}_labels"] = encode_pair(pair["prompt"], pair[side])
        return item


class PreferencePairs(pl.LightningDataModule):
    """Prompt / chosen / rejected triples of token ids; SFT trains on the chosen answers, DPO on both.

    Embedded default (no file, no tokenizer): random prompts whose chosen answer copies their first
    ``answer_length`` tokens and whose rejected answer is other random tokens. With ``path``, a ``.jsonl``
    file of ``{"prompt": [...], "chosen": [...], "rejected": [...]}`` token ids (tokenize with the model's
    tokenizer beforehand), split into train and validation by ``val_fraction``.

    Batches: ``chosen_input_ids``, ``chosen_labels`` (-100 on prompt and padding),
    ``chosen_attention_mask`` and the same three for ``rejected`` (:func:`collate_pairs`). The training
    order depends only on ``seed`` and the epoch, so a resumed run sees the batches of an uninterrupted one.

    Args:
        path: optional ``.jsonl`` file instead of the embedded task.
        num_train: embedded training pairs.
        num_val: embedded validation pairs.
        vocab_size: token ids of the embedded task are ``1 .. vocab_size - 1`` (0 pads).
        prompt_length: embedded prompt tokens.
        answer_length: embedded answer tokens.
        val_fraction: share of a file's pairs used for validation.
        batch_size: pairs per batch.
        pad_token_id: the id padding is written with.
        shuffle: shuffle the training pairs each epoch.
        seed: seed of the embedded pairs, of the file split and of the shuffling.
    """

    def __init__(
        self,
        path: str | None = None,
        num_train: int = 256,
        num_val: int = 64,
        vocab_size: int = 64,
        prompt_length: int = 8,
        answer_length: int = 4,
        val_fraction: float = 0.2,
        batch_size: int = 16,
        pad_token_id: int = 0,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.path = path
        self.num_train, self.num_val = num_train, num_val
        self.shape = (vocab_size, prompt_length, answer_length)
        self.val_fraction = val_fraction
        self.batch_size = batch_size
        self.pad_token_id = pad_token_id
        self.shuffle = shuffle
        self.seed = seed
        self.train_set: _PairDataset | None = None
        self.val_set: _PairDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if self.path is not None:
            pairs = _read_jsonl(self.path)
            order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(self.seed)).tolist()
            num_val = int(round(len(pairs) * self.val_fraction))
            self.val_set = _PairDataset([pairs[i] for i in order[:num_val]])
            self.train_set = _PairDataset([pairs[i] for i in order[num_val:]])
        else:
            self.train_set = _PairDataset(synthetic_pairs(self.num_train, *self.shape, seed=self.seed))
            self.val_set = _PairDataset(synthetic_pairs(self.num_val, *self.shape, seed=self.seed + 1))

    def _loader(self, dataset: Any, train: bool) -> DataLoader:
        sampler = EpochShuffleSampler(dataset, seed=self.seed, shuffle=train and self.shuffle)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler,
                          collate_fn=self._collate)  # fmt: skip

    def _collate(self, items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        return collate_pairs(items, self.pad_token_id)

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None, "call setup() first"
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None, "call setup() first"
        return self._loader(self.val_set, train=False)
