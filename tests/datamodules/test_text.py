"""Text multi-task data; `datasets` is an optional extra: the plain-Python engine and the error without it."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from torch import nn

from lightning_mtl.datamodules.text import TextMultiTask, WordVocabulary, load_records
from lightning_mtl.multitask.module import MultiTaskModule
from lightning_mtl.multitask.tasks import MISSING_LABEL, ClassificationTask, RegressionTask
from tests.fixtures.trainers import tiny_trainer

ROWS = [
    {"text": "Great movie, great fun!", "topic": "film", "stars": 5, "score": 0.9},
    {"text": "The match was dull.", "topic": "sport", "stars": 2, "score": 0.1},
    {"text": "A great match", "topic": "sport", "stars": 4, "score": None},
    {"text": "dull film", "topic": None, "stars": 1, "score": 0.2},
]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_python_engine_encodes_texts_and_labels(tmp_path):
    train = _write(tmp_path / "train.jsonl", ROWS)
    val = tmp_path / "val.csv"
    val.write_text("text,topic,stars,score\nunseen great words,film,5,0.5\n")
    dm = TextMultiTask(train, tasks=["topic", "stars", "score"], val=str(val), engine="python", max_length=5)
    assert dm.num_classes == {"topic": 2, "stars": 4, "score": 1}
    dm.setup()
    vocab = dm.vocabulary
    # "great" is the most frequent word: id 2; padding 0; unknown words 1
    assert vocab.index["great"] == 2
    ids = dm.train_set.inputs
    assert ids.shape == (4, 5) and ids.dtype == torch.long
    assert ids[0].tolist() == [2, vocab.index["movie"], vocab.index[","], 2, vocab.index["fun"]]  # cut at 5
    assert ids[3].tolist() == [vocab.index["dull"], vocab.index["film"], 0, 0, 0]
    assert dm.val_set.inputs[0].tolist() == [1, 2, 1, 0, 0]
    assert dm.train_set.targets["topic"].tolist() == [0, 1, 1, MISSING_LABEL]
    assert dm.train_set.targets["stars"].tolist() == [3, 1, 2, 0]  # classes 1, 2, 4, 5
    assert torch.isnan(dm.train_set.targets["score"][2]) and dm.val_set.targets["stars"].tolist() == [3]
    assert len(dm.test_set) == 0 and dm.vocab_size == len(vocab)


def test_trains_a_small_text_model(tmp_path):
    train = _write(tmp_path / "train.jsonl", ROWS * 4)
    dm = TextMultiTask(train, tasks=["topic", "score"], val=train, engine="python", max_length=6, batch_size=8)

    class BagOfWords(nn.Module):
        out_features = 8

        def __init__(self):
            super().__init__()
            self.embed = nn.EmbeddingBag(dm.vocab_size, 8, padding_idx=0)

        def forward(self, ids):
            return self.embed(ids)

    model = MultiTaskModule(
        BagOfWords(), {"topic": ClassificationTask(2), "score": RegressionTask()}, aggregator="pcgrad"
    )
    trainer = tiny_trainer(max_steps=2, limit_val_batches=1)
    trainer.fit(model, dm)
    assert trainer.global_step == 2 and "val/topic/acc" in trainer.callback_metrics


def test_datasets_engine_without_the_extra_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if the extra were not installed
    train = _write(tmp_path / "train.jsonl", ROWS)
    with pytest.raises(ImportError, match=r"lightning-mtl\[text\]"):
        TextMultiTask(train, tasks=["topic"]).setup()
    with pytest.raises(ImportError, match="datasets"):
        load_records({"train": train}, "datasets")


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="TextMultiTask"):
        TextMultiTask(str(tmp_path / "no.jsonl"), tasks=["topic"], engine="python").setup()
    train = _write(tmp_path / "train.jsonl", ROWS)
    with pytest.raises(ValueError, match="no column"):
        TextMultiTask(train, tasks=["mood"], engine="python").setup()
    assert WordVocabulary.tokenize("Hi, you!") == ["hi", ",", "you", "!"]
