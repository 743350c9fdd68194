"""EDA operations against hand examples, and the (seed, epoch, index, view) determinism of augment()."""

from __future__ import annotations

import random

import pytest

from lightning_mtl.finetuning import EDA, random_deletion, random_insertion, random_swap, synonym_replacement


def test_synonym_replacement_replaces_every_occurrence_of_the_chosen_words_from_the_table():
    words = "the quick fox saw the quick dog".split()
    table = {"quick": ["fast"], "dog": ["hound"]}
    # n = 2 >= the two words with an entry: both are replaced, each occurrence alike; one synonym each
    assert synonym_replacement(words, 2, table, random.Random(0)) == "the fast fox saw the fast hound".split()
    # n = 1: exactly one of the two
    out = synonym_replacement(words, 1, table, random.Random(0))
    assert out in ("the fast fox saw the fast dog".split(), "the quick fox saw the quick hound".split())
    assert synonym_replacement(words, 3, {"cat": ["feline"]}, random.Random(0)) == words  # no entry: unchanged


def test_random_insertion_inserts_a_synonym_of_a_word_of_the_sentence():
    out = random_insertion(["cat"], 1, {"cat": ["feline"]}, random.Random(3))
    assert out in (["feline", "cat"], ["cat", "feline"])
    # no entry at all: a copy of one of its own words
    out = random_insertion(["a", "b"], 2, {}, random.Random(1))
    assert len(out) == 4 and sorted(set(out)) <= ["a", "b"] and out.count("a") >= 1 and out.count("b") >= 1


def test_random_swap_of_two_words_reverses_them_and_keeps_the_multiset():
    assert random_swap(["a", "b"], 1, random.Random(5)) == ["b", "a"]
    words = "one two three four five six".split()
    out = random_swap(words, 3, random.Random(0))
    assert sorted(out) == sorted(words)
    assert random_swap(["alone"], 4, random.Random(0)) == ["alone"]


def test_random_deletion_keeps_all_with_p_0_and_one_word_with_p_1():
    words = "one two three four".split()
    assert random_deletion(words, 0.0, random.Random(0)) == words
    out = random_deletion(words, 1.0, random.Random(0))
    assert len(out) == 1 and out[0] in words
    kept = random_deletion(words, 0.5, random.Random(0))
    assert kept == [w for w in words if w in kept]  # an ordered subsequence


def test_the_number_of_changed_words_is_alpha_of_the_sentence_at_least_one():
    eda = EDA(alpha=0.25, operations=["insert"])
    text = " ".join(f"w{i}" for i in range(12))
    assert len(eda.augment(text, epoch=0, index=0).split()) == 12 + 3  # int(0.25 * 12)
    assert len(EDA(alpha=0.01, operations=["insert"]).augment("a b c", 0, 0).split()) == 4  # at least one


def test_augment_depends_only_on_seed_epoch_index_and_view():
    text = "return a new list of the given values in sorted order with duplicates removed"
    eda = EDA(alpha=0.2, seed=7)
    again = EDA(alpha=0.2, seed=7)
    assert eda.augment(text, 3, 11, 1) == again.augment(text, 3, 11, 1)  # another object, the same draw
    draws = {eda.augment(text, epoch, 11, 1) for epoch in range(8)}
    assert len(draws) > 1  # a new augmentation each epoch
    assert {eda.augment(text, 0, i, 1) for i in range(8)} != {text}


def test_bad_settings_get_one_sentence():
    with pytest.raises(ValueError, match="subset of"):
        EDA(operations=["backtranslate"])
    with pytest.raises(ValueError, match="alpha"):
        EDA(alpha=1.5)
    # without a table replacement is left out of the draw (it would be the identity)
    assert "synonym" not in EDA().operations and "synonym" in EDA(synonyms={"a": ["b"]}).operations
