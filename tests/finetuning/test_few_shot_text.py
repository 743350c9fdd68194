"""FewShotText: the per-class split, the batch layout (originals, then augmented copies with their labels),
augmentation only in training and fixed by (seed, epoch, index), files and their errors."""

from __future__ import annotations

import json

import pytest
import torch

from lightning_mtl.finetuning import EDA, FewShotText, docstring_topics


def _texts(data, ids):
    inverse = {i: w for w, i in data.vocabulary.index.items()}
    return [" ".join(inverse.get(int(t), "?") for t in row if t != 0) for row in ids]


def test_the_embedded_task_splits_per_class_without_overlap():
    data = FewShotText(per_class=16, val_per_class=8, test_per_class=20, seed=3)
    data.setup()
    assert data.classes == ["files", "network", "numbers", "text"] and data.num_classes == 4
    for split, per in (("train", 16), ("val", 8), ("test", 20)):
        counts = torch.bincount(torch.tensor([y for _, y in data.splits[split]]), minlength=4)
        assert counts.tolist() == [per] * 4, split
    seen = [t for s in ("train", "val", "test") for t, _ in data.splits[s]]
    assert len(seen) == len(set(seen))
    other = FewShotText(per_class=16, val_per_class=8, test_per_class=20, seed=4)
    other.setup()
    assert {t for t, _ in other.splits["train"]} != {t for t, _ in data.splits["train"]}
    assert len(docstring_topics()) == sum(len(v) for v in data.splits.values())


def test_a_training_batch_holds_the_originals_then_their_augmented_copies():
    eda = EDA(alpha=0.3, operations=["swap"], seed=1)
    data = FewShotText(per_class=4, val_per_class=2, augment=eda, num_views=2, batch_size=5, max_length=64)
    batch = next(iter(data.train_dataloader()))
    out = data.encode(batch, epoch=2)
    assert out["input_ids"].shape == (15, 64)
    assert torch.equal(out["labels"], batch["labels"].repeat(3))
    texts = _texts(data, out["input_ids"])
    for k, (text, index) in enumerate(zip(batch["text"], batch["index"].tolist())):
        for view in (1, 2):
            expected = eda.augment(text, 2, index, view)
            assert texts[view * 5 + k] == " ".join(data.vocabulary.tokenize(expected))
            # a swap keeps the words: the copy is a permutation of the original's
            assert sorted(texts[view * 5 + k].split()) == sorted(texts[k].split())
    # no epoch (validation, test, outside a Trainer): no copies
    plain = data.encode(batch)
    assert torch.equal(plain["input_ids"], out["input_ids"][:5]) and torch.equal(plain["labels"], batch["labels"])
    assert not torch.equal(data.encode(batch, epoch=3)["input_ids"], out["input_ids"])  # new copies each epoch


def test_files_and_their_errors(tmp_path):
    rows = [
        {"sentence": f"item {i} is {'good' if i % 2 else 'bad'}", "y": "pos" if i % 2 else "neg"} for i in range(12)
    ]
    (tmp_path / "pool.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "test.jsonl").write_text(json.dumps({"sentence": "item x is good", "y": "pos"}))
    data = FewShotText(str(tmp_path / "pool.jsonl"), str(tmp_path / "test.jsonl"), "sentence", "y", per_class=3,
                       val_per_class=2)  # fmt: skip
    data.setup()
    assert (
        data.classes == ["neg", "pos"]
        and len(data.splits["train"]) == 6
        and data.splits["test"] == [("item x is good", 1)]
    )
    with pytest.raises(ValueError, match="fewer than per_class"):
        FewShotText(str(tmp_path / "pool.jsonl"), None, "sentence", "y", per_class=5, val_per_class=2).setup()
    with pytest.raises(ValueError, match="no column"):
        FewShotText(str(tmp_path / "pool.jsonl")).setup()
    with pytest.raises(FileNotFoundError):
        FewShotText(str(tmp_path / "missing.jsonl")).setup()
    with pytest.raises(ValueError, match="needs an `augment`"):
        FewShotText(num_views=1)
