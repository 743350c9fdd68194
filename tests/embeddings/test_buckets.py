"""LengthBucketSampler and PairsDataModule's length bucketing: the plain order is EpochShuffleSampler's,
bucketed batches pad less, orders depend on (seed, epoch) only, DDP shares are disjoint parts of each global
batch, and a fit resumed inside an epoch sees the batches the uninterrupted fit saw next."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_mtl.datamodules import EpochShuffleSampler
from lightning_mtl.embeddings import BiEncoder, LengthBucketSampler, PairsDataModule
from tests.fixtures.trainers import tiny_trainer

LENGTHS = np.random.default_rng(0).integers(1, 100, size=100).tolist()


def _batches(order, size):
    return [order[i : i + size] for i in range(0, len(order), size)]


def _padding(order, size):
    """Padding tokens when each batch pads to its longest sample."""
    return sum(max(LENGTHS[i] for i in b) * len(b) - sum(LENGTHS[i] for i in b) for b in _batches(order, size))


def test_without_lengths_the_order_is_the_epoch_shuffle():
    for epoch in (0, 3):
        plain, reference = LengthBucketSampler(37, 4, seed=5), EpochShuffleSampler(37, seed=5)
        plain.set_epoch(epoch)
        reference.set_epoch(epoch)
        assert list(plain) == list(reference)


def test_bucketed_batches_pad_less_and_depend_on_seed_and_epoch_only():
    sampler = LengthBucketSampler(100, 8, LENGTHS, pool=4, seed=1)
    orders = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert sorted(order) == list(range(100))  # every sample once
        twin = LengthBucketSampler(100, 8, LENGTHS, pool=4, seed=1)
        twin.set_epoch(epoch)
        assert list(twin) == order
        plain = LengthBucketSampler(100, 8, seed=1)
        plain.set_epoch(epoch)
        assert _padding(order, 8) < 0.5 * _padding(list(plain), 8)  # 1239 against 3607 tokens at seed 1, epoch 0
        # each batch is a run of its pool sorted by length: the 4 pools of 32 give 12 full batches, then 4
        pools = [sorted(list(plain)[p : p + 32], key=lambda i: LENGTHS[i]) for p in range(0, 100, 32)]
        runs = {tuple(b) for pool in pools for b in _batches(pool, 8)}
        assert {tuple(b) for b in _batches(order, 8)} == runs
        assert tuple(order[-4:]) == tuple(pools[-1][-4:])  # the partial batch stays last
        orders.append(order)
    assert orders[0] != orders[1]


@pytest.mark.parametrize("lengths", [None, LENGTHS[:50]])
def test_ddp_shares_are_disjoint_parts_of_each_global_batch(lengths):
    ranks = [LengthBucketSampler(50, 4, lengths, pool=2, seed=3, rank=r, world_size=2) for r in (0, 1)]
    for sampler in ranks:
        sampler.set_epoch(2)
    shares = [list(s) for s in ranks]
    order = ranks[0].order(2)
    assert len(shares[0]) == len(shares[1]) == 25 == len(ranks[0])
    assert sorted(shares[0] + shares[1]) == list(range(50))  # disjoint, complete (50 is even: no padding)
    for k, global_batch in enumerate(_batches(order, 8)):
        assert set(shares[0][4 * k : 4 * k + 4]) | set(shares[1][4 * k : 4 * k + 4]) == set(global_batch)


def test_skip_starts_inside_one_epoch_only():
    sampler = LengthBucketSampler(30, 4, LENGTHS[:30], pool=2, seed=0)
    sampler.set_epoch(1)
    full = list(sampler)
    sampler.skip(1, 3)
    assert list(sampler) == full[12:]
    assert list(sampler) == full  # the next pass of the epoch is whole again
    sampler.skip(0, 2)
    sampler.set_epoch(1)
    assert list(sampler) == full  # a skip of another epoch does not apply
    with pytest.raises(ValueError, match="lengths has 3 entries for 30 samples"):
        LengthBucketSampler(30, 4, [1, 2, 3])


def _pairs_file(tmp_path):
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(40):
        n = int(rng.integers(1, 12))
        rows.append({"anchor": f"query {i} " + " ".join(words[:n]), "positive": f"doc {i} " + " ".join(words[-n:])})
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_the_data_module_buckets_by_token_length(tmp_path):
    path = _pairs_file(tmp_path)

    def padding(bucketing):
        data = PairsDataModule(train=path, batch_size=4, vocab_size=200, length_bucketing=bucketing, bucket_pool=10)
        data.setup("fit")
        masks = [b[side]["attention_mask"] for b in data.train_dataloader() for side in ("anchor", "positive")]
        return sum(int((m == 0).sum()) for m in masks)

    assert padding(True) < padding(False)


class _Anchors(Callback):
    def __init__(self) -> None:
        self.batches: list[list[list[int]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append(batch["anchor"]["input_ids"].tolist())


def test_a_fit_resumed_mid_epoch_sees_the_remaining_batches(tmp_path):
    path = _pairs_file(tmp_path)
    config = dict(model_type="bert", vocab_size=200, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=16, max_position_embeddings=64)  # fmt: skip

    def run(ckpt_path=None):
        torch.manual_seed(0)
        record = _Anchors()
        saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1, filename="{step}")
        trainer = tiny_trainer(max_epochs=2, callbacks=[record, saver], enable_checkpointing=True,
                               limit_val_batches=0)  # fmt: skip
        data = PairsDataModule(train=path, batch_size=4, vocab_size=200, length_bucketing=True, bucket_pool=3)
        trainer.fit(BiEncoder(config=config), datamodule=data, ckpt_path=ckpt_path)
        return record.batches, trainer

    full, _ = run()
    assert len(full) == 20
    for step in (4, 12):  # inside the first epoch, inside the second
        resumed, trainer = run(tmp_path / f"step={step}.ckpt")
        assert resumed == full[step:], step
        assert trainer.global_step == 20


class _SaveAnchors(Callback):
    def __init__(self, folder) -> None:
        self.folder, self.rows = folder, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        mask = batch["anchor"]["attention_mask"].bool()
        self.rows += [tuple(ids[m].tolist()) for ids, m in zip(batch["anchor"]["input_ids"], mask)]

    def on_train_epoch_end(self, trainer, pl_module):
        torch.save(self.rows, self.folder / f"rows{trainer.global_rank}.pt")


@pytest.mark.slow
def test_under_ddp_each_rank_trains_on_its_own_share(tmp_path):
    from tests.fixtures.ddp import SpawnDDP

    path = _pairs_file(tmp_path)
    config = dict(model_type="bert", vocab_size=200, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=16, max_position_embeddings=64)  # fmt: skip
    data = PairsDataModule(train=path, batch_size=4, vocab_size=200, length_bucketing=True, bucket_pool=2)
    trainer = tiny_trainer(strategy=SpawnDDP(), devices=2, max_epochs=1, limit_val_batches=0,
                           callbacks=[_SaveAnchors(tmp_path)])  # fmt: skip
    trainer.fit(BiEncoder(config=config), datamodule=data)
    shares = [torch.load(tmp_path / f"rows{r}.pt") for r in (0, 1)]
    data.setup("fit")
    everything = [tuple(data.tokenizer(row["anchor"])["input_ids"]) for row in data.rows("train")]
    assert len(shares[0]) == len(shares[1]) == 20  # 40 pairs, 2 ranks: 5 batches of 4 each
    assert sorted(shares[0] + shares[1]) == sorted(everything)  # disjoint and complete
