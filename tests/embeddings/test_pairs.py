"""PairsDataModule: jsonl / csv files with domains and hard negatives, tokenisation in the collate (dynamic
padding, rows grouped by domain), the embedded corpus, and one-sentence errors."""

from __future__ import annotations

import csv
import json

import pytest

from lightning_mtl.embeddings import PairsDataModule, embedded_pairs, train_wordpiece
from lightning_mtl.embeddings.embedded import DOMAINS

pytest.importorskip("transformers")

ROWS = [
    {"q": "how to sort a list", "d": "use sorted on the list", "neg": ["open a file"], "dom": "code"},
    {"q": "capital of france", "d": "paris is the capital of france", "neg": ["berlin is big"], "dom": "geo"},
    {"q": "reverse a string", "d": "slice the string backwards with a step of minus one", "neg": ["x"], "dom": "code"},
    {"q": "longest river", "d": "the nile", "neg": ["the alps"], "dom": "geo"},
]
COLUMNS = {"anchor": "q", "positive": "d", "negative": "neg", "domain": "dom"}


def _write(tmp_path, kind, rows=ROWS):
    path = tmp_path / f"pairs.{kind}"
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows([{**r, "neg": r["neg"][0]} for r in rows])
    return str(path)


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_files_give_tokenised_batches_grouped_by_domain_with_dynamic_padding(tmp_path, kind):
    path = _write(tmp_path, kind)
    data = PairsDataModule(train=path, val=path, columns=COLUMNS, batch_size=4, vocab_size=200)
    data.setup("fit")
    assert data.domain_names == ["code", "geo"]
    batch = next(iter(data.val_dataloader()))
    assert batch["domain"].tolist() == [0, 0, 1, 1]  # stably sorted: rows 0, 2, 1, 3
    order = [0, 2, 1, 3]
    decode = data.tokenizer.batch_decode
    assert decode(batch["anchor"]["input_ids"], skip_special_tokens=True) == [ROWS[i]["q"] for i in order]
    assert decode(batch["negative"]["input_ids"][:, 0], skip_special_tokens=True) == [ROWS[i]["neg"][0] for i in order]
    assert batch["negative"]["input_ids"].shape[:2] == (4, 1)
    ids, mask = batch["positive"]["input_ids"], batch["positive"]["attention_mask"]
    assert ids.shape[1] == int(mask.sum(1).max())  # padded to the longest text of this batch only
    assert (ids[mask == 0] == data.tokenizer.pad_token_id).all() and data.tokenizer.pad_token_id == 0


def test_embedded_corpus_has_three_domains_and_is_reproducible():
    rows = embedded_pairs(per_domain=50, seed=1)
    assert {r["domain"] for r in rows} == set(DOMAINS) and len(rows) == 150
    assert rows == embedded_pairs(per_domain=50, seed=1) and rows != embedded_pairs(per_domain=50, seed=2)
    assert all(r["anchor"] and r["positive"] and r["anchor"] != r["positive"] for r in rows)
    data = PairsDataModule(per_domain=50, val_fraction=0.2, batch_size=8)
    data.setup("fit")
    assert len(data.rows("val")) == 30 and len(data.rows("train")) == 120
    assert data.domain_names == list(DOMAINS)
    batch = next(iter(data.train_dataloader()))
    assert batch["domain"].tolist() == sorted(batch["domain"].tolist())
    assert len(data.tokenizer) <= 2048


def test_trained_wordpiece_round_trips_its_training_text():
    tokenizer = train_wordpiece(["the quick brown fox", "jumps over the lazy dog"], vocab_size=100)
    ids = tokenizer(["the lazy fox"])["input_ids"][0]
    assert (
        tokenizer.convert_ids_to_tokens(ids)[0] == "[CLS]"
        and tokenizer.decode(ids, skip_special_tokens=True) == "the lazy fox"
    )


def test_bad_input_gives_one_sentence(tmp_path):
    path = _write(tmp_path, "jsonl")
    with pytest.raises(ValueError, match=r"pairs file .* has no column 'positive' \(columns: q, d, neg, dom\)"):
        PairsDataModule(train=path, columns={"anchor": "q"}).setup("fit")
    with pytest.raises(
        FileNotFoundError, match="train pairs file or saved datasets folder 'nowhere.jsonl' does not exist"
    ):
        PairsDataModule(train="nowhere.jsonl")
    with pytest.raises(ValueError, match=r"unknown pair field\(s\) \['query'\]"):
        PairsDataModule(columns={"query": "q"})
    with pytest.raises(ValueError, match=r"domain 'geo' is not among the domains \['code'\]"):
        PairsDataModule(train=path, columns=COLUMNS, domains=["code"]).setup("fit")
    uneven = [*ROWS[:3], {**ROWS[3], "neg": ["a", "b"]}]
    with pytest.raises(ValueError, match=r"the same number of hard negatives, found \[1, 2\]"):
        (tmp_path / "uneven").mkdir()
        PairsDataModule(train=_write(tmp_path / "uneven", "jsonl", uneven), columns=COLUMNS).setup("fit")
    with pytest.raises(FileNotFoundError, match="tokenizer folder 'no_tokenizer' does not exist"):
        PairsDataModule(train=path, columns=COLUMNS, tokenizer="no_tokenizer").setup("fit")


def test_the_built_tokenizer_is_the_same_every_time_so_a_resumed_run_reads_the_same_ids():
    from lightning_mtl.embeddings.pairs import train_wordpiece

    texts = ["the quick brown fox", "the lazy dog", "a quick dog", "brown foxes jump"] * 3 + ["zebra"]
    first, second = train_wordpiece(texts, 80), train_wordpiece(list(reversed(texts)), 80)
    assert first.get_vocab() == second.get_vocab()  # the trainer of `tokenizers` broke ties differently per run
    assert first.convert_tokens_to_ids("[PAD]") == 0
    ids = first("The dogs")["input_ids"]  # seen words whole, an unseen one by its longest known pieces
    assert first.convert_ids_to_tokens(ids) == ["[CLS]", "the", "dog", "##s", "[SEP]"]
    with pytest.raises(ValueError, match="vocab_size"):
        train_wordpiece(texts, 10)


def test_a_saved_datasets_folder_reads_as_its_file_would(tmp_path):
    """`save_to_disk` folders: a Dataset is read whole, a DatasetDict at the split's name; a missing split is
    one sentence."""
    import datasets  # in the dev extra

    path = _write(tmp_path, "jsonl")
    single, both = tmp_path / "single", tmp_path / "dict"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(single))
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS[:3]), "val": datasets.Dataset.from_list(ROWS[3:])}
    ).save_to_disk(str(both))
    from_file = PairsDataModule(train=path, val=path, columns=COLUMNS, batch_size=4, vocab_size=200)
    from_folder = PairsDataModule(train=str(single), val=str(single), columns=COLUMNS, batch_size=4, vocab_size=200)
    for data in (from_file, from_folder):
        data.setup("fit")
    assert from_folder.splits == from_file.splits
    split = PairsDataModule(train=str(both), val=str(both), columns=COLUMNS, batch_size=4, vocab_size=200)
    split.setup("fit")
    assert [r["anchor"] for r in split.splits["train"]] == [r["q"] for r in ROWS[:3]]
    assert [r["anchor"] for r in split.splits["val"]] == [ROWS[3]["q"]]
    with pytest.raises(ValueError, match="no split 'test'"):
        PairsDataModule(train=str(both), test=str(both), columns=COLUMNS, vocab_size=200).setup("test")
