"""The preference-pair data module: the embedded task, padding, the .jsonl format and its errors."""

from __future__ import annotations

import json

import pytest
import torch

from lightning_mtl.finetuning import PreferencePairs, collate_pairs, encode_pair, synthetic_pairs


def test_the_embedded_pairs_copy_the_prompt_and_reject_other_tokens():
    pairs = synthetic_pairs(200, vocab_size=5, prompt_length=6, answer_length=3, seed=0)
    for pair in pairs:
        assert pair["chosen"] == pair["prompt"][:3]
        assert all(r != c and 1 <= r < 5 for r, c in zip(pair["rejected"], pair["chosen"]))
    assert synthetic_pairs(200, 5, 6, 3, seed=0) == pairs
    assert synthetic_pairs(200, 5, 6, 3, seed=1) != pairs


def test_collate_pads_both_sides_to_one_length_with_ignored_labels():
    items = []
    for prompt, chosen, rejected in [([5, 6], [7], [8, 9, 4]), ([5], [7, 7], [8])]:
        item = {}
        item["chosen_input_ids"], item["chosen_labels"] = encode_pair(prompt, chosen)
        item["rejected_input_ids"], item["rejected_labels"] = encode_pair(prompt, rejected)
        items.append(item)
    batch = collate_pairs(items, pad_token_id=0)
    assert batch["chosen_input_ids"].tolist() == [[5, 6, 7, 0, 0], [5, 7, 7, 0, 0]]
    assert batch["chosen_labels"].tolist() == [[-100, -100, 7, -100, -100], [-100, 7, 7, -100, -100]]
    assert batch["rejected_attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]


def test_a_jsonl_file_is_split_and_its_errors_name_the_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": [1, 2, 3], "chosen": [4], "rejected": [5]}) for _ in range(10)))
    data = PreferencePairs(path=str(path), val_fraction=0.2, batch_size=4)
    data.setup()
    assert (len(data.train_set), len(data.val_set)) == (8, 2)
    assert next(iter(data.train_dataloader()))["chosen_input_ids"].shape == (4, 4)

    with pytest.raises(FileNotFoundError, match="PreferencePairs: data not found at"):
        PreferencePairs(path=str(tmp_path / "missing.jsonl")).setup()
    path.write_text(json.dumps({"prompt": [1], "chosen": [2]}))
    with pytest.raises(ValueError, match=r"line 1 of .* lacks \['rejected'\]"):
        PreferencePairs(path=str(path)).setup()


def test_the_training_order_depends_only_on_the_seed_and_the_epoch():
    orders = []
    for _ in range(2):
        data = PreferencePairs(num_train=24, batch_size=8, seed=3)
        data.setup()
        loader = data.train_dataloader()
        loader.sampler.set_epoch(1)
        orders.append(torch.cat([b["chosen_input_ids"] for b in loader]))
    assert torch.equal(orders[0], orders[1])
