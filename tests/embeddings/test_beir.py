"""BeirPairsDataModule on a tiny BEIR-layout fixture (tests/embeddings/beir_tiny): pairs from the qrels' positive
grades, hard negatives (mined file, graded 0, seeded random), domains from query metadata, one-sentence errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lightning_mtl.embeddings import BeirPairsDataModule, BiEncoder, RetrievalEvaluation, load_beir
from tests.fixtures.trainers import tiny_trainer

pytest.importorskip("transformers")

FOLDER = str(Path(__file__).with_name("beir_tiny"))
DOCS = {
    "d1": "Sorting sorted returns a new sorted list",
    "d2": "list.sort sorts the list in place",  # empty title: the text alone
    "d3": "Files open returns a file object",
    "d4": "Paris paris is the capital of france",
    "d5": "Rivers the nile is the longest river",
    "d6": "Mountains everest is the highest mountain",
    "d7": "Strings a slice with step minus one reverses a string",
    "d8": "Berlin berlin is the capital of germany",
}


def _data(**kwargs):
    data = BeirPairsDataModule(FOLDER, vocab_size=200, batch_size=8, **kwargs)
    data.setup("fit")
    return data


def test_pairs_are_the_positive_grades_with_titles_and_domains():
    data = _data(domain_key="domain")
    pairs = [(row["anchor"], row["positive"], row["domain"]) for row in data.rows("train")]
    # q1 has two relevant documents; grade-0 lines are not pairs; q4's second line names no document
    assert pairs == [
        ("how do i sort a list", DOCS["d1"], 0),
        ("how do i sort a list", DOCS["d2"], 0),
        ("capital of france", DOCS["d4"], 1),
        ("reverse a string", DOCS["d7"], 0),
        ("longest river on earth", DOCS["d5"], 1),
    ]
    assert data.domain_names == ["code", "geo"]
    assert [(r["anchor"], r["positive"]) for r in data.rows("val")] == [("highest mountain", DOCS["d6"])]
    assert [(r["anchor"], r["positive"]) for r in data.rows("test")] == [("how to read a file", DOCS["d3"])]
    # the evaluation reader sees the same documents
    assert load_beir(FOLDER, "train").corpus == list(DOCS.values())


def test_negatives_come_from_the_mined_file_then_grade_zero_then_seeded_random():
    graded = {r["anchor"]: r["negative"] for r in _data(num_negatives=1).rows("train")}
    assert graded["how do i sort a list"] == [DOCS["d3"]]  # its grade-0 document
    assert graded["capital of france"] == [DOCS["d8"]]
    for query, relevant in (("reverse a string", "d7"), ("longest river on earth", "d5")):  # nothing judged
        assert graded[query][0] in DOCS.values() and graded[query][0] != DOCS[relevant]
    again = {r["anchor"]: r["negative"] for r in _data(num_negatives=1).rows("train")}
    assert again == graded  # seeded by (seed, query): the same in every run
    mined = {
        r["anchor"]: r["negative"] for r in _data(num_negatives=2, negatives=f"{FOLDER}/negatives.jsonl").rows("train")
    }
    assert mined["reverse a string"] == [DOCS["d1"], DOCS["d2"]]  # the listed d7 is relevant: skipped
    assert mined["how do i sort a list"][0] == DOCS["d3"]  # not in the file: grade 0 first
    relevant = {"how do i sort a list": {"d1", "d2"}, "capital of france": {"d4"}, "longest river on earth": {"d5"}}
    for query, negatives in mined.items():
        assert len(set(negatives)) == 2 and not {DOCS[d] for d in relevant.get(query, ())} & set(negatives)
    batch = next(iter(_data(num_negatives=2).train_dataloader()))
    assert batch["negative"]["input_ids"].shape[:2] == (5, 2)


def test_a_bi_encoder_fits_on_the_folder_and_is_scored_on_its_dev_qrels(tmp_path):
    config = dict(model_type="bert", vocab_size=200, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=32, max_position_embeddings=64)  # fmt: skip
    evaluation = RetrievalEvaluation(FOLDER, split="dev", ks=(1, 3), domain=0)
    trainer = tiny_trainer(max_epochs=1, default_root_dir=tmp_path, callbacks=[evaluation])
    trainer.fit(BiEncoder(config=config, num_experts=2), datamodule=_data(domain_key="domain", num_negatives=1))
    assert trainer.global_step == 1
    # one dev query, one relevant document among 8: recall@3 is 0 or 1, the MRR one of 1, 1/2, ..., 1/8
    mrr = float(trainer.callback_metrics["val/retrieval/mrr"])
    assert any(abs(mrr - 1 / rank) < 1e-6 for rank in range(1, 9))


def test_bad_input_gives_one_sentence(tmp_path):
    with pytest.raises(FileNotFoundError, match="BEIR folder '.*missing' does not exist"):
        BeirPairsDataModule(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="reads its pairs from `folder`: drop train"):
        BeirPairsDataModule(FOLDER, train="pairs.jsonl")
    with pytest.raises(ValueError, match="unknown split"):
        BeirPairsDataModule(FOLDER, qrels={"dev": "dev"})
    with pytest.raises(ValueError, match="query 'q1' has only 6 documents that are not relevant to it"):
        _data(num_negatives=7)
    with pytest.raises(ValueError, match="query 'q1' has no 'topic' field"):
        _data(domain_key="topic")
    bad = tmp_path / "bad"
    shutil.copytree(FOLDER, bad)
    (bad / "qrels/train.tsv").unlink()
    with pytest.raises(FileNotFoundError, match="has no qrels/train.tsv"):
        BeirPairsDataModule(str(bad)).setup("fit")
    shutil.copy(f"{FOLDER}/qrels/dev.tsv", bad / "qrels/train.tsv")
    (bad / "qrels/dev.tsv").write_text("query\tcorpus-id\tscore\nq5\td6\t1\n")
    with pytest.raises(ValueError, match="has no column 'query-id'"):
        BeirPairsDataModule(str(bad)).setup("fit")
    (bad / "qrels/dev.tsv").unlink()
    (bad / "corpus.jsonl").write_text('{"_id": "d6", "title": "no text"}\n')
    with pytest.raises(ValueError, match="line 1 has no field 'text'"):
        BeirPairsDataModule(str(bad)).setup("fit")
    (bad / "corpus.jsonl").write_text('{"_id": "d1", "text": "another document"}\n')
    with pytest.raises(ValueError, match="qrels/train.tsv of .* has no line with a positive grade"):
        BeirPairsDataModule(str(bad)).setup("fit")
