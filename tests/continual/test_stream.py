"""The Si-Blurry split and the stream data module: split properties, schedule, exposure labels, reservoir
replay, resume and DDP sharding, with the sklearn digits as the source."""

from __future__ import annotations

import math
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

import lightning_mtl.continual.stream as stream_module
from lightning_mtl.continual.stream import SiBlurryStream, StreamBatch, StreamStep, si_blurry_split
from lightning_mtl.continual.transforms import ViTEvalTransform, ViTTrainTransform
from lightning_mtl.datamodules import Digits
from tests.fixtures.trainers import one_thread, tiny_trainer  # noqa: F401


def _labels(num_classes=20, per_class=30, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(num_classes), per_class))


def _home(split, num_tasks):
    """class -> task where its disjoint / blurry chunk lives."""
    home = {}
    for t in range(num_tasks):
        for c in [*split.disjoint_classes[t].tolist(), *split.blurry_classes[t].tolist()]:
            home[c] = t
    return home


# --------------------------------------------------------------------------------------------------
# si_blurry_split
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stochastic", [True, False])
def test_every_sample_once_and_class_groups(stochastic):
    labels = _labels(num_classes=23, per_class=17)
    split = si_blurry_split(
        labels, num_tasks=4, disjoint_class_ratio=0.5, blurry_sample_ratio=0.1, stochastic=stochastic, seed=3
    )
    assert len(split.tasks) == 4
    assert np.array_equal(np.sort(np.concatenate(split.tasks)), np.arange(len(labels)))
    disjoint = np.concatenate(split.disjoint_classes)
    blurry = np.concatenate(split.blurry_classes)
    assert len(disjoint) == 11 and len(blurry) == 12  # floor(23 * 0.5) disjoint, the rest blurry
    assert set(disjoint.tolist()).isdisjoint(blurry.tolist())
    assert set(disjoint.tolist()) | set(blurry.tolist()) == set(range(23))
    home = _home(split, 4)
    blurred = set(split.blurred.tolist())
    for t, members in enumerate(split.tasks):
        for index in members.tolist():
            label = int(labels[index])
            if label in set(disjoint.tolist()):
                assert home[label] == t  # disjoint classes never leak
                assert index not in blurred
            elif index not in blurred:
                assert home[label] == t  # only pooled blurry samples leave their home task
    assert set(labels[split.blurred].tolist()) <= set(blurry.tolist())
    # the task lists are shuffled, not in data-set order
    assert any(np.any(np.diff(members) < 0) for members in split.tasks)


def test_i_blurry_has_equal_tasks_and_evenly_dealt_blurry_samples():
    labels = _labels(num_classes=20, per_class=30)
    split = si_blurry_split(labels, num_tasks=5, stochastic=False, seed=1)
    assert [len(c) for c in split.disjoint_classes] == [2] * 5
    assert [len(c) for c in split.blurry_classes] == [2] * 5
    # each task gives floor(10% of its 60 blurry samples) = 6; the pool of 30 is dealt 6 per task
    assert len(split.blurred) == 30
    home = _home(split, 5)
    blurry = set(np.concatenate(split.blurry_classes).tolist())
    for t, members in enumerate(split.tasks):
        assert len(members) == 120  # 2 * 30 disjoint + 2 * 30 blurry - 6 given + 6 received
        received = np.isin(members, split.blurred).sum()
        assert received == 6
        own_blurry = [i for i in members.tolist() if labels[i] in blurry and home[int(labels[i])] == t]
        given = [i for i in split.blurred.tolist() if home[int(labels[i])] == t]
        assert len(given) == 6 and len(set(own_blurry) | set(given)) == 60
    # counts that do not divide: nothing is dropped, the first tasks take the remainder
    labels = _labels(num_classes=13, per_class=11)
    split = si_blurry_split(labels, num_tasks=5, stochastic=False, seed=0)
    assert [len(c) for c in split.disjoint_classes] == [2, 1, 1, 1, 1]
    assert [len(c) for c in split.blurry_classes] == [2, 2, 1, 1, 1]
    received = [int(np.isin(m, split.blurred).sum()) for m in split.tasks]
    assert max(received) - min(received) <= 1 and sum(received) == len(split.blurred)
    assert np.array_equal(np.sort(np.concatenate(split.tasks)), np.arange(len(labels)))


def test_stochastic_boundaries_vary_with_the_seed_and_repeat_with_it():
    labels = _labels(num_classes=20, per_class=30)
    counts, received_counts, exact_pools = set(), set(), 0
    for seed in range(25):
        split = si_blurry_split(labels, num_tasks=5, seed=seed)
        per_task = tuple(len(d) + len(b) for d, b in zip(split.disjoint_classes, split.blurry_classes))
        counts.add(per_task)
        assert sum(len(d) for d in split.disjoint_classes) == 10 and sum(per_task) == 20
        received = tuple(int(np.isin(m, split.blurred).sum()) for m in split.tasks)
        received_counts.add(received)
        pool = math.floor(0.1 * 300)
        assert len(split.blurred) <= pool and sum(received) == len(split.blurred)
        home_blurry = [int(np.isin(labels, b).sum()) for b in split.blurry_classes]
        if min(home_blurry) >= pool:  # no task too small to give its amount: the pool is exactly 10%
            assert len(split.blurred) == pool
            exact_pools += 1
    assert len(counts) > 10  # classes per task vary with the seed
    assert any(0 in c for c in counts)  # a task can get no class of its own
    assert len(received_counts) > 10  # blurry samples are dealt in random amounts
    assert exact_pools > 0
    a = si_blurry_split(labels, num_tasks=5, seed=7)
    b = si_blurry_split(labels, num_tasks=5, seed=7)
    assert all(np.array_equal(x, y) for x, y in zip(a.tasks, b.tasks))
    assert np.array_equal(a.blurred, b.blurred)


def test_extreme_ratios():
    labels = _labels(num_classes=10, per_class=10)
    split = si_blurry_split(labels, num_tasks=5, disjoint_class_ratio=1.0, blurry_sample_ratio=0.5, seed=0)
    assert sum(len(b) for b in split.blurry_classes) == 0 and len(split.blurred) == 0
    split = si_blurry_split(labels, num_tasks=5, disjoint_class_ratio=0.0, blurry_sample_ratio=0.0, stochastic=False)
    assert len(split.blurred) == 0 and [len(b) for b in split.blurry_classes] == [2] * 5


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_tasks=0), "num_tasks"),
        (dict(num_tasks=2.5), "num_tasks"),
        (dict(disjoint_class_ratio=50), "share, not a percentage"),
        (dict(blurry_sample_ratio=-0.1), "blurry_sample_ratio"),
    ],
)
def test_split_argument_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        si_blurry_split(_labels(), **kwargs)


@pytest.mark.parametrize(
    "labels", [np.array([], dtype=np.int64), np.array([[0, 1]]), np.array([0.5, 1.0]), np.array([-1, 0])]
)
def test_split_rejects_bad_labels(labels):
    with pytest.raises(ValueError, match="labels"):
        si_blurry_split(labels)


# --------------------------------------------------------------------------------------------------
# the stream
# --------------------------------------------------------------------------------------------------
def _stream(**kwargs) -> SiBlurryStream:
    source_kwargs = kwargs.pop("source_kwargs", {})
    defaults = dict(num_tasks=3, batch_size=32, online_iter=1.0, seed=0)
    defaults.update(kwargs)
    return SiBlurryStream(Digits(as_dict=False, **source_kwargs), **defaults)


def _train_inputs_and_labels(dm):
    source = dm.source
    return source.train_set.inputs, source.train_set.targets.numpy()


def _keys(dm):
    """Per step, the (row, num_seen, is_new) keys the batch sampler hands to the dataset."""
    return list(dm.train_dataloader().batch_sampler)


def test_exposure_relabelling_and_served_samples():
    dm = _stream()
    dm.setup("fit")
    inputs, labels = _train_inputs_and_labels(dm)
    stream_rows = np.concatenate(dm.split.tasks)
    # exposure order by hand: original labels in order of first appearance along the stream
    first_seen: list[int] = []
    for label in labels[stream_rows].tolist():
        if label not in first_seen:
            first_seen.append(label)
    assert dm.class_order == first_seen and dm.num_classes == 10
    xs, ys, seen = [], [], []
    for batch, step in zip(dm.train_dataloader(), dm.schedule, strict=True):
        assert isinstance(batch, StreamBatch) and batch.is_new.all()
        assert batch.y.dtype == torch.long and batch.num_seen.dtype == torch.long and batch.is_new.dtype == torch.bool
        assert (batch.num_seen == step.num_seen).all()
        xs.append(batch.x)
        ys.append(batch.y)
        seen.append(len(set(torch.cat(ys).tolist())))
        assert step.num_seen == seen[-1] and int(torch.cat(ys).max()) == seen[-1] - 1
    assert torch.equal(torch.cat(xs), inputs[stream_rows])  # the right samples, in stream order
    expected = np.array([first_seen.index(label) for label in labels[stream_rows]])
    assert np.array_equal(torch.cat(ys).numpy(), expected)


def _reps(online_iter: float, num_batches: int) -> list[int]:
    return [math.floor(online_iter * (i + 1) + 1e-9) - math.floor(online_iter * i + 1e-9) for i in range(num_batches)]


@pytest.mark.parametrize("online_iter", [1.0, 3.0, 1.5])
def test_online_schedule(online_iter):
    dm = _stream(online_iter=online_iter, batch_size=50)
    sizes = [len(t) for t in dm.split.tasks]
    per_task = [math.ceil(n / 50) for n in sizes]
    reps = _reps(online_iter, sum(per_task))
    assert len(dm.schedule) == sum(reps)
    # stream batches never cross a task boundary; each is repeated reps[i] times in a row
    batch_sizes = [min(50, n - 50 * j) for n in sizes for j in range(math.ceil(n / 50))]
    tasks = [t for t, count in enumerate(per_task) for _ in range(count)]
    expected = []
    samples = 0
    for index, (count, size, task) in enumerate(zip(reps, batch_sizes, tasks)):
        samples += size
        for rep in range(count):
            expected.append((index, samples, task, rep == count - 1))
    got = [(s.stream_batch, s.samples_seen, s.task, s.last_rep) for s in dm.schedule]
    assert got == expected
    assert [i for i, s in enumerate(dm.schedule) if s.task_end] == [
        max(i for i, s in enumerate(dm.schedule) if s.task == t) for t in range(3) if sizes[t]
    ]
    assert dm.schedule[-1].samples_seen == sum(sizes) == len(dm.source.train_set)
    if online_iter == 1.5:
        assert reps[:4] == [1, 2, 1, 2]
    # repetitions of a stream batch serve the same samples
    keys = _keys(dm)
    assert len(keys) == len(dm.schedule)
    for i in range(1, len(keys)):
        if dm.schedule[i].stream_batch == dm.schedule[i - 1].stream_batch:
            assert keys[i] == keys[i - 1]


def test_offline_schedule_runs_epochs_per_task():
    dm = _stream(online=False, epochs_per_task=2, batch_size=64)
    sizes = [len(t) for t in dm.split.tasks]
    per_task = [math.ceil(n / 64) for n in sizes]
    assert len(dm.schedule) == 2 * sum(per_task)
    keys = _keys(dm)
    start = 0
    for task, count in enumerate(per_task):
        steps = dm.schedule[start : start + 2 * count]
        assert all(s.task == task for s in steps)
        assert [s.last_rep for s in steps] == [False] * count + [True] * count
        assert [s.task_end for s in steps] == [False] * (2 * count - 1) + [True]
        first = [r for k in keys[start : start + count] for r, _, _ in k]
        second = [r for k in keys[start + count : start + 2 * count] for r, _, _ in k]
        assert first == dm.split.tasks[task].tolist()  # the first pass follows the stream order
        assert sorted(second) == sorted(first) and second != first  # the second pass reshuffles it
        assert steps[-1].samples_seen == sum(sizes[: task + 1])
        start += 2 * count


def test_fresh_augmentation_on_every_repetition():
    augment = ViTTrainTransform(image_size=8, padding=2, mean=None, std=None)
    dm = _stream(online_iter=2.0, source_kwargs=dict(train_transform=augment))
    torch.manual_seed(0)
    loader = iter(dm.train_dataloader())
    first, second = next(loader), next(loader)
    assert dm.schedule[0].stream_batch == dm.schedule[1].stream_batch == 0
    assert torch.equal(first.y, second.y) and not torch.equal(first.x, second.x)


def _reservoir(dm, new_rows, memory_size):
    """Memory before each step, by a hand-written algorithm R over the stream batches (each added after its
    last repetition), with the generator SiBlurryStream documents (SeedSequence([seed, 11]))."""
    rng = np.random.default_rng(np.random.SeedSequence([dm.seed, 11]))
    memory, seen, states = [], 0, []
    for i, step in enumerate(dm.schedule):
        states.append(list(memory))
        if step.last_rep:
            for row in new_rows[i]:
                seen += 1
                if len(memory) < memory_size:
                    memory.append(row)
                else:
                    slot = int(rng.integers(0, seen))
                    if slot < memory_size:
                        memory[slot] = row
    return states


def test_reservoir_memory_batches():
    dm = _stream(online_iter=1.5, memory_size=7, memory_batch_size=7)
    keys = _keys(dm)
    states = _reservoir(dm, [[r for r, _, new in k if new] for k in keys], 7)
    earlier: set[int] = set()
    for i, (step, k) in enumerate(zip(dm.schedule, keys)):
        new = [r for r, _, is_new in k if is_new]
        old = [r for r, _, is_new in k if not is_new]
        assert all(num_seen == step.num_seen for _, num_seen, _ in k)
        assert set(old) <= earlier and set(old).isdisjoint(new)  # only samples of earlier stream batches
        assert len(old) == len(set(old)) == min(7, len(earlier))  # the cap; distinct draws
        assert sorted(old) == sorted(states[i])  # the whole memory: exactly the hand-written reservoir
        if step.last_rep:
            earlier |= set(new)
    # a smaller memory batch: distinct samples of the memory
    small = _stream(online_iter=1.5, memory_size=7, memory_batch_size=3, seed=0)
    for k, state in zip(_keys(small), states):
        old = [r for r, _, is_new in k if not is_new]
        assert len(old) == min(3, len(state)) == len(set(old)) and set(old) <= set(state)
    # served items: memory rows carry exposure labels and is_new False
    batch = list(dm.train_dataloader())[-1]
    rows = [r for r, _, is_new in keys[-1] if not is_new]
    exposure = {label: k for k, label in enumerate(dm.class_order)}
    _, labels = _train_inputs_and_labels(dm)
    assert batch.is_new.tolist() == [True] * (len(batch.y) - len(rows)) + [False] * len(rows)
    assert batch.y[~batch.is_new].tolist() == [exposure[int(labels[r])] for r in rows]


def test_no_memory_without_memory_size():
    dm = _stream(memory_size=0, memory_batch_size=16)
    assert all(all(is_new for _, _, is_new in k) for k in _keys(dm))


def test_test_and_task_datasets():
    dm = _stream(source_kwargs=dict(train_transform=ViTTrainTransform(8, padding=2, mean=None, std=None),
                                    eval_transform=ViTEvalTransform(8, mean=None, std=None)))  # fmt: skip
    dm.setup("fit")
    test_labels = dm.source.test_set.targets.numpy()
    exposure = {label: k for k, label in enumerate(dm.class_order)}
    for num_seen in (0, 1, 4, 10):
        dataset = dm.test_dataset(num_seen)
        expected = [exposure[int(label)] for label in test_labels if exposure[int(label)] < num_seen]
        assert [int(dataset[i][1]) for i in range(len(dataset))] == expected
    x, y = next(iter(dm.test_dataloader()))
    assert len(dm.test_dataloader().dataset) == len(test_labels)
    assert y.tolist() == [exposure[int(label)] for label in test_labels[: len(y)]] and len(y) == 64
    assert torch.equal(x, next(iter(dm.val_dataloader()))[0])  # eval transform: deterministic
    task = dm.task_dataset(1)
    assert len(task) == len(dm.split.tasks[1])
    x1, y1 = task[0]
    assert torch.equal(x1, task[0][0])  # evaluation transform, no augmentation
    row = int(dm.split.tasks[1][0])
    assert int(y1) == exposure[int(dm.source.train_set.targets[row])]
    with pytest.raises(ValueError, match="task"):
        dm.task_dataset(3)


# --------------------------------------------------------------------------------------------------
# resume and DDP
# --------------------------------------------------------------------------------------------------
class _Linear(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(64, 10)

    def training_step(self, batch: StreamBatch, batch_idx: int):
        return F.cross_entropy(self.layer(batch.x.flatten(1)), batch.y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class _Recorder(Callback):
    def __init__(self) -> None:
        self.batches: dict[int, tuple[torch.Tensor, ...]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches[batch_idx] = tuple(t.clone() for t in batch)


def test_resume_mid_stream_continues_the_same_stream(tmp_path):
    kwargs = dict(num_tasks=3, batch_size=48, online_iter=1.5, memory_size=40, memory_batch_size=16, seed=5)
    full = _Recorder()
    dm = _stream(**kwargs)
    checkpoints = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=13, save_top_k=-1, filename="{step}")
    trainer = tiny_trainer(callbacks=[full, checkpoints], enable_checkpointing=True)
    trainer.fit(_Linear(), datamodule=dm)
    total = len(dm.schedule)
    assert sorted(full.batches) == list(range(total))
    # the same data module object starts a new fit from the beginning
    assert len(list(dm.train_dataloader())) == total

    resumed = _Recorder()
    ckpt = tmp_path / "step=26.ckpt"
    assert torch.load(ckpt, weights_only=False)["SiBlurryStream"]["consumed_batches"] == 26
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tiny_trainer(callbacks=[resumed]).fit(_Linear(), datamodule=_stream(**kwargs), ckpt_path=str(ckpt))
    assert not [w for w in caught if "not resumable" in str(w.message)]
    assert sorted(resumed.batches) == list(range(26, total))
    for batch_idx, batch in resumed.batches.items():
        assert all(torch.equal(a, b) for a, b in zip(batch, full.batches[batch_idx]))
    assert any((~full.batches[i][3]).any() for i in range(26, total))  # replayed samples were compared too


def test_ddp_needs_use_distributed_sampler_off():
    dm = _stream()
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False)
    dm.trainer = trainer
    with pytest.raises(RuntimeError, match=r"Trainer\(use_distributed_sampler=False\)"):
        dm.setup("fit")
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", use_distributed_sampler=False, logger=False)
    dm.trainer = trainer
    dm.setup("fit")  # no error


def test_each_rank_takes_its_rows_of_every_step(monkeypatch):
    dm = _stream(online_iter=2.0, memory_size=20, memory_batch_size=5)
    whole = _keys(dm)
    for rank in range(3):
        monkeypatch.setattr(stream_module, "_rank_and_world", lambda rank=rank: (rank, 3))
        shares = _keys(dm)
        assert len(shares) == len(whole)
        for share, keys in zip(shares, whole):
            assert share == keys[rank::3]


def test_stream_argument_validation():
    for kwargs, match in [
        (dict(online_iter=0.5), "online_iter"),
        (dict(disjoint_class_ratio=50), "disjoint_class_ratio"),
        (dict(batch_size=0), "batch_size"),
        (dict(memory_size=-1), "memory_size"),
        (dict(epochs_per_task=0), "epochs_per_task"),
        (dict(num_tasks=0), "num_tasks"),
    ]:
        with pytest.raises(ValueError, match=match):
            _stream(**kwargs)
    with pytest.raises(TypeError, match="as_dict=False"):
        SiBlurryStream(Digits(as_dict=True)).setup("fit")
    with pytest.raises(TypeError, match="data module"):
        SiBlurryStream(object())


def test_stream_step_is_frozen():
    step = StreamStep(0, 1, 1, 0, True, False)
    with pytest.raises(AttributeError):
        step.task = 2  # type: ignore[misc]
