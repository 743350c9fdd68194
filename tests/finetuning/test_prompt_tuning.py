"""Prompt tuned embedding classification: what trains (and nothing else), the prompt read as words, the
threshold rule against a hand computation, thresholds through checkpoints to the test figures, resume and
bf16-mixed on CPU."""

from __future__ import annotations

import csv
import functools
import json

import lightning.pytorch as pl
import pytest
import torch
from sklearn.metrics import average_precision_score, f1_score

from lightning_mtl.architectures.transformers_encoder import pool
from lightning_mtl.finetuning import MultiLabelText, PromptTunedClassifier, choose_thresholds
from tests.finetuning._multilabel import BERT, write_splits
from tests.fixtures.trainers import one_thread, tiny_trainer  # noqa: F401

TRAINED = {"prompt", "head.weight", "head.bias"}


def _data(tmp_path, **kwargs):
    return MultiLabelText(**write_splits(tmp_path), **{"batch_size": 8, "shuffle": False, **kwargs})


def _module(**kwargs):
    defaults = dict(num_labels=3, config=BERT, prompt_length=4, lr=1e-2, head_lr=1e-2)
    return PromptTunedClassifier(**{**defaults, **kwargs})


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_a_step_changes_only_the_prompt_and_the_head_bit_for_bit(tmp_path):
    torch.manual_seed(0)
    module, data = _module(), _data(tmp_path)
    before = _snapshot(module)
    tiny_trainer(max_steps=2, limit_val_batches=0).fit(module, datamodule=data)
    after = _snapshot(module)
    for key in TRAINED:
        assert (after[key] != before[key]).all(), f"{key} did not train everywhere"
    for key, value in before.items():
        if key not in TRAINED | {"pos_weight"}:
            assert torch.equal(value, after[key]), f"{key} changed"
    counts = data.label_counts()  # pos_weight="balanced": max_k n_k / n_k, as the official code
    assert torch.equal(after["pos_weight"], counts.max() / counts)
    assert {n for n, p in module.named_parameters() if p.requires_grad} == TRAINED


@pytest.mark.parametrize("pooling", ["mean", "cls", "last"])
def test_prompt_length_0_is_the_frozen_models_pooled_embedding(pooling):
    module = _module(prompt_length=0, pooling=pooling).eval()
    ids = torch.tensor([[5, 9, 12, 7, 3], [8, 4, 6, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        hidden = module.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        if pooling == "last":
            expected = hidden[torch.arange(2), mask.sum(1) - 1]
        else:
            expected = pool(hidden, mask, pooling)
        assert torch.equal(module.embed(ids, mask), expected)
        assert torch.equal(module(ids, mask), module.head(expected))


def test_the_soft_prompt_is_read_as_the_words_whose_embeddings_it_holds():
    """A prompt that holds the embeddings of tokens t gives the text the states it has after the input t."""
    module = _module(prompt_length=3, pooling="mean").eval()
    prompt_ids = torch.tensor([11, 22, 33])
    with torch.no_grad():
        module.prompt.copy_(module.encoder.get_input_embeddings()(prompt_ids))
        ids = torch.tensor([[5, 9, 12, 7], [8, 4, 0, 0]])
        mask = (ids != 0).long()
        full = torch.cat([prompt_ids.expand(2, -1), ids], 1)
        full_mask = torch.cat([torch.ones(2, 3, dtype=torch.long), mask], 1)
        hidden = module.encoder(input_ids=full, attention_mask=full_mask).last_hidden_state[:, 3:]
        torch.testing.assert_close(module.embed(ids, mask), pool(hidden, mask, "mean"), rtol=1e-6, atol=1e-6)
        assert not torch.allclose(module.embed(ids, mask), _module(prompt_length=0).eval().embed(ids, mask))


def test_thresholds_equal_a_hand_computation():
    probs = torch.tensor([
        [0.9, 0.5, 0.8, 0.7],
        [0.8, 0.5, 0.6, 0.6],
        [0.7, 0.5, 0.4, 0.5],
        [0.6, 0.2, 0.2, 0.4],
        [0.2, 0.1, 0.1, 0.3],
    ])  # fmt: skip
    targets = torch.tensor([
        [1, 1, 1, 0],
        [0, 0, 0, 0],
        [1, 0, 0, 0],
        [1, 1, 1, 0],
        [0, 0, 0, 0],
    ])  # fmt: skip
    # label 0: cuts at 0.9 / 0.8 / 0.7 / 0.6 / 0.2 give F1 2/4, 2/5, 4/6, 6/7, 6/8 -> 0.6
    # label 1: the three 0.5 go together: F1 at 0.5 = 2/5, at 0.2 = 4/6, at 0.1 = 4/7 -> 0.2
    # label 2: F1 2/3 at 0.8 and at 0.2 (2/4 at 0.6, 2/5 at 0.4): the tie goes to the higher threshold, 0.8
    # label 3: no positive text keeps the default
    thresholds = choose_thresholds(probs, targets, default=0.5)
    assert torch.equal(thresholds, torch.tensor([0.6, 0.2, 0.8, 0.5]))


def _brute_force(probs, targets, default):
    out = []
    for k in range(probs.shape[1]):
        p, y = probs[:, k].tolist(), targets[:, k].tolist()
        if sum(y) == 0:
            out.append(default)
            continue
        best, chosen = -1.0, None
        for t in sorted(set(p), reverse=True):
            tp = sum(1 for pi, yi in zip(p, y) if pi >= t and yi)
            f1 = 2 * tp / (sum(1 for pi in p if pi >= t) + sum(y))
            if f1 > best + 1e-12:
                best, chosen = f1, t
        out.append(chosen)
    return torch.tensor(out)


def test_thresholds_equal_an_exhaustive_search_on_random_scores_with_ties():
    generator = torch.Generator().manual_seed(0)
    probs = torch.randint(0, 12, (40, 5), generator=generator).float() / 12  # many ties
    targets = (torch.rand(40, 5, generator=generator) < 0.3).long()
    targets[:, 4] = 0
    assert torch.equal(choose_thresholds(probs, targets, 0.25), _brute_force(probs, targets, 0.25))


def _scores(module, loader):
    module.eval()
    with torch.no_grad():
        parts = [(torch.sigmoid(module(b["input_ids"], b["attention_mask"])), b["labels"]) for b in loader]
    return torch.cat([p for p, _ in parts]), torch.cat([t for _, t in parts])


def test_thresholds_are_chosen_on_validation_saved_and_used_at_test(tmp_path):
    torch.manual_seed(0)
    module, data = _module(), _data(tmp_path)
    trainer = tiny_trainer(max_epochs=2, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=data)
    val_scores, val_targets = _scores(module, data.val_dataloader())
    assert torch.equal(module.thresholds, choose_thresholds(val_scores, val_targets))
    assert not torch.equal(module.thresholds, torch.full((3,), 0.5))

    trainer.save_checkpoint(tmp_path / "fit.ckpt")
    loaded = PromptTunedClassifier.load_from_checkpoint(tmp_path / "fit.ckpt")
    assert torch.equal(loaded.thresholds, module.thresholds)
    figures = tiny_trainer().test(loaded, datamodule=data, verbose=False)[0]
    scores, targets = _scores(loaded, data.test_dataloader())
    predicted = (scores >= module.thresholds).long().numpy()
    assert figures["test/f1_macro"] == pytest.approx(f1_score(targets.numpy(), predicted, average="macro"), abs=1e-6)
    assert figures["test/f1_micro"] == pytest.approx(f1_score(targets.numpy(), predicted, average="micro"), abs=1e-6)
    expected_map = average_precision_score(targets.numpy(), scores.numpy(), average="macro")
    assert figures["test/map"] == pytest.approx(expected_map, abs=1e-5)


def test_a_fixed_threshold_is_never_tuned(tmp_path):
    module = _module(thresholds=0.3)
    tiny_trainer(max_steps=1, num_sanity_val_steps=0).fit(module, datamodule=_data(tmp_path))
    assert torch.equal(module.thresholds, torch.full((3,), 0.3))


def test_a_prompt_from_the_labels_holds_their_token_embeddings(tmp_path):
    data = _data(tmp_path)
    module = _module(prompt_length=5, prompt_init="labels")
    tiny_trainer(max_steps=0, limit_val_batches=0).fit(module, datamodule=data)
    label_ids = torch.tensor(data.label_token_ids())
    assert data.encode(["blue green red"])[0] == label_ids.tolist()  # one word-level token per label
    table = module.encoder.get_input_embeddings().weight
    assert torch.equal(module.prompt[:3], table[label_ids])
    rest = [int((table == row).all(1).nonzero()) for row in module.prompt[3:]]  # vocabulary rows, no label again
    assert len(set(rest)) == 2 and not set(rest) & set(label_ids.tolist())
    short = _module(prompt_length=2, prompt_init="labels")
    tiny_trainer(max_steps=0, limit_val_batches=0).fit(short, datamodule=data)
    assert all(any(torch.equal(row, table[i]) for i in label_ids) for row in short.prompt)  # a subset


class _StopAfterFirstEpoch(pl.Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        trainer.should_stop = True


def test_resume_from_a_checkpoint_reproduces_the_uninterrupted_run_bit_for_bit(tmp_path):
    """The run stopped after epoch 1 was planned for 2: its learning-rate decay spans both epochs."""

    def run(ckpt=None, callbacks=()):
        torch.manual_seed(0)
        module = _module()
        trainer = tiny_trainer(max_epochs=2, num_sanity_val_steps=0, callbacks=list(callbacks))
        trainer.fit(module, datamodule=_data(tmp_path, shuffle=True), ckpt_path=ckpt)
        return module, trainer

    whole, _ = run()
    _, first = run(callbacks=[_StopAfterFirstEpoch()])
    assert first.global_step == 4
    first.save_checkpoint(tmp_path / "epoch1.ckpt")
    checkpoint = torch.load(tmp_path / "epoch1.ckpt", weights_only=False)
    assert sorted(checkpoint["state_dict"]) == ["head.bias", "head.weight", "pos_weight", "prompt", "prompt_ready",
                                                "thresholds"]  # fmt: skip
    resumed, trainer = run(tmp_path / "epoch1.ckpt")
    assert trainer.global_step == 8
    for key in sorted(TRAINED) + ["thresholds"]:
        assert torch.equal(resumed.state_dict()[key], whole.state_dict()[key]), key
    torch.manual_seed(0)
    assert not torch.equal(whole.prompt, _module().prompt)  # it trained


def test_the_learning_rates_decay_exponentially_to_lr_decay(tmp_path):
    module = _module(lr=1e-2, head_lr=1e-3, lr_decay=0.01, optimizer=functools.partial(torch.optim.SGD, lr=5.0))
    trainer = tiny_trainer(max_epochs=1, limit_val_batches=0)
    trainer.fit(module, datamodule=_data(tmp_path))  # 4 steps: the last one at 1% of the start
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.SGD)
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.last_epoch == 4
    # the rate at step s is 0.01 ** (s / 3): after the 4 steps the schedule stands at step 4
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-2 * 0.01 ** (4 / 3), 1e-3 * 0.01 ** (4 / 3)])


def test_bf16_mixed_trains_on_cpu_with_float32_parameters(tmp_path):
    """(Lightning turns 16-mixed on the CPU into bf16-mixed; 16-mixed with its gradient scaler needs a GPU.)"""
    torch.manual_seed(0)
    module = _module()
    before = _snapshot(module)
    trainer = tiny_trainer(max_epochs=1, num_sanity_val_steps=0, precision="bf16-mixed")
    trainer.fit(module, datamodule=_data(tmp_path))
    assert module.prompt.dtype == module.head.weight.dtype == torch.float32
    assert not torch.equal(module.prompt, before["prompt"])
    for key, value in module.encoder.state_dict().items():
        assert torch.equal(value, before[f"encoder.{key}"]), key
    assert 0 <= float(trainer.callback_metrics["val/map"]) <= 1


def test_bad_input_gets_one_sentence(tmp_path):
    with pytest.raises(ValueError, match="prompt_length must be >= 0"):
        _module(prompt_length=-1)
    with pytest.raises(ValueError, match="pooling must be 'mean', 'cls' or 'last'"):
        _module(pooling="max")
    with pytest.raises(ValueError, match="thresholds must be 'validation' or a number"):
        _module(thresholds="test")
    with pytest.raises(ValueError, match="thresholds must be 'validation' or a number in \\(0, 1\\), got 1.5"):
        _module(thresholds=1.5)
    with pytest.raises(
        ValueError,
        match=r"needs a transformers model \(with get_input_embeddings\(\) and a config\), and Linear is not one",
    ):
        PromptTunedClassifier(num_labels=3, encoder=torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="exactly one of `path`"):
        PromptTunedClassifier(num_labels=3)
    with pytest.raises(ValueError, match="the data have 3 labels and the classifier num_labels=4: set num_labels: 3"):
        tiny_trainer(max_steps=1).fit(_module(num_labels=4), datamodule=_data(tmp_path))
    module = _module(prompt_length=40)
    with pytest.raises(ValueError, match="40 prompt tokens \\+ 9 text tokens exceed the encoder's 48 positions"):
        module(torch.ones(1, 9, dtype=torch.long))


def test_data_files_jsonl_and_csv_give_the_same_batches_and_bad_files_one_sentence(tmp_path):
    splits = write_splits(tmp_path, train=12, val=4, test=4)
    csv_splits = {}
    for split, path in splits.items():
        rows = list(open(path))
        csv_path = tmp_path / f"{split}.csv"
        with open(csv_path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "labels"])
            for line in rows:
                row = json.loads(line)
                writer.writerow([row["text"], ";".join(row["labels"])])
        csv_splits[split] = str(csv_path)
    a, b = MultiLabelText(**splits, batch_size=4), MultiLabelText(**csv_splits, batch_size=4)
    for data in (a, b):
        data.setup()
    assert a.label_names == b.label_names == ["blue", "green", "red"]
    for split in ("train", "val", "test"):
        loaders = [getattr(data, f"{split}_dataloader")() for data in (a, b)]
        for x, y in zip(*loaders):
            assert all(torch.equal(x[k], y[k]) for k in ("input_ids", "attention_mask", "labels"))
    first = next(iter(a.test_dataloader()))
    row = json.loads(open(splits["test"]).readline())
    assert first["labels"][0].tolist() == [float(n in row["labels"]) for n in ("blue", "green", "red")]

    held_out = MultiLabelText(train=splits["train"], val_fraction=0.25)
    held_out.setup()
    assert (len(held_out.sets["train"]), len(held_out.sets["val"])) == (9, 3)
    with pytest.raises(ValueError, match=r"train file '.*train.jsonl' has no column 'body' \(columns: text, labels\)"):
        MultiLabelText(train=splits["train"], text_column="body").setup()
    with pytest.raises(FileNotFoundError, match="train file 'missing.jsonl' does not exist"):
        MultiLabelText(train="missing.jsonl")
    with pytest.raises(ValueError, match="label 'red' is not one of the labels \\['blue', 'green'\\]"):
        MultiLabelText(**splits, label_names=["blue", "green"]).setup()


def test_the_embedded_corpus_is_labelled_by_its_keywords():
    data = MultiLabelText(batch_size=4)
    data.setup()
    assert data.label_names == ["collections", "errors", "files", "numbers", "text", "time"]
    sizes = {split: len(rows) for split, rows in data.rows.items()}
    assert sizes["train"] > 400 and sizes["val"] == sizes["test"] > 50
    for row in data.rows["train"][:50]:
        words = set(row["text"].lower().replace(",", " ").replace(".", " ").split())
        if "file" in words or "files" in words:
            assert "files" in row["labels"]
        assert row["labels"]
    assert (data.label_counts() > 0).all()
