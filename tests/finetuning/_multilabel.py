"""A tiny random BERT (built from a config, nothing downloaded) and small multi-label text files shared by the
prompt-tuning tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

# no dropout: steps compared across runs and processes must see the same network
BERT = dict(model_type="bert", num_hidden_layers=2, num_attention_heads=2, hidden_size=16, intermediate_size=32,
            vocab_size=64, max_position_embeddings=48, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip

# each label has its words; a text holds words of its labels and filler words
WORDS = {"red": ["apple", "cherry"], "green": ["leaf", "grass"], "blue": ["sky", "sea"]}
FILLER = ["the", "a", "of", "and", "to", "in"]


def rows(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        labels = sorted(rng.sample(sorted(WORDS), rng.randint(1, 2)))
        words = [rng.choice(WORDS[label]) for label in labels] + rng.sample(FILLER, rng.randint(1, 5))
        rng.shuffle(words)
        out.append({"text": " ".join(words), "labels": labels})
    return out


def write_jsonl(path: Path, count: int, seed: int = 0) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows(count, seed)))
    return str(path)


def write_splits(folder: Path, train: int = 32, val: int = 16, test: int = 16) -> dict[str, str]:
    return {split: write_jsonl(folder / f"{split}.jsonl", count, seed)
            for seed, (split, count) in enumerate([("train", train), ("val", val), ("test", test)])}  # fmt: skip
