import functools
import math
from typing import NamedTuple

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_mtl.continual.vor import (
    VirtualOutlierRegularization,
    boundary_points,
    energy,
    knn_distance,
    sample_virtual_outliers,
    vor_loss,
)
from tests.fixtures.ddp import SpawnDDP
from tests.fixtures.trainers import (
    one_thread,  # noqa: F401
    tiny_trainer,
)


def _kth_by_sorting(queries, bank, k, exclude_self=False):
    """Reference k-NN distance: explicit differences, a full sort, self removed by masking."""
    distance = (queries[:, None, :] - bank[None, :, :]).pow(2).sum(-1).sqrt()
    if exclude_self:
        distance = distance + torch.diag(torch.full((len(bank),), float("inf"), dtype=distance.dtype))
    return distance.sort(dim=1).values[:, k - 1]


def _cluster(n=120, dim=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    centre = torch.randn(dim, generator=g, dtype=dtype)
    return 3 * centre + 0.8 * torch.randn(n, dim, generator=g, dtype=dtype)


# -- the generator ------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 3, 7])
def test_knn_distance_matches_a_sorted_reference(k):
    g = torch.Generator().manual_seed(1)
    bank = torch.randn(30, 5, generator=g, dtype=torch.float64)
    queries = torch.randn(11, 5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(knn_distance(queries, bank, k), _kth_by_sorting(queries, bank, k))
    # exclude_self: a point is not its own neighbour (else every 1-NN distance would be 0); chunked
    torch.testing.assert_close(
        knn_distance(bank, bank, k, exclude_self=True, chunk_size=4), _kth_by_sorting(bank, bank, k, exclude_self=True)
    )
    with pytest.raises(ValueError, match="k must be in 1 .. 29"):
        knn_distance(bank, bank, 30, exclude_self=True)


def test_boundary_points_are_the_top_by_kth_neighbour_distance_of_the_normalized_features():
    features = _cluster()
    normed = features / features.norm(dim=1, keepdim=True)
    reference = _kth_by_sorting(normed, normed, 10, exclude_self=True).argsort(descending=True)[:15]
    assert torch.equal(boundary_points(features, k=10, num_boundary=15), reference)
    # normalized, not raw: scaling single samples moves nothing
    scaled = features * torch.linspace(0.5, 4.0, len(features), dtype=features.dtype)[:, None]
    assert torch.equal(boundary_points(scaled, k=10, num_boundary=15), reference)
    # small classes: k and the count are clipped; one sample is its own boundary point
    assert sorted(boundary_points(features[:4], k=50, num_boundary=50).tolist()) == [0, 1, 2, 3]
    assert boundary_points(features[:1]).tolist() == [0]


def test_outliers_lie_outside_the_class_and_around_their_boundary_points():
    features = _cluster()
    normed = features / features.norm(dim=1, keepdim=True)
    k = 10
    out = sample_virtual_outliers(
        features, k=k, num_boundary=10, num_candidates=100, cov=0.1, num_outliers=30,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert out.outliers.shape == (30, 8) and out.sources.shape == (30,)
    assert set(out.sources.tolist()) <= set(boundary_points(features, k, 10).tolist())
    outlier_d = _kth_by_sorting(out.outliers, normed, k)
    id_d = _kth_by_sorting(normed, normed, k, exclude_self=True)
    # farther from the class than the boundary point each came from, and than the median sample
    assert (outlier_d > id_d[out.sources]).all()
    assert outlier_d.min() > id_d.median()
    # centred on the (unit-norm) boundary points, not on the origin as the official generator
    to_source = (out.outliers - normed[out.sources]).norm(dim=1).mean()
    to_origin = out.outliers.norm(dim=1).mean()
    assert to_source < 0.6 < 0.8 < to_origin
    # the kept ones are the farthest candidates: their distances come out in decreasing order
    assert (outlier_d[:-1] >= outlier_d[1:] - 1e-12).all()


def test_candidate_offsets_have_standard_deviation_cov():
    # keeping every candidate shows the raw offsets: cov * N(0, I), i.e. std cov (not sqrt(cov))
    features = _cluster(n=40, dim=16)
    normed = features / features.norm(dim=1, keepdim=True)
    out = sample_virtual_outliers(features, k=5, num_boundary=4, num_candidates=500, cov=0.1, num_outliers=2000,
                                  generator=torch.Generator().manual_seed(3))  # fmt: skip
    offsets = out.outliers - normed[out.sources]
    assert offsets.mean().abs() < 0.01
    assert offsets.std().item() == pytest.approx(0.1, rel=0.03)


def test_generator_is_reproducible():
    features = _cluster()
    a = sample_virtual_outliers(features, k=5, num_candidates=20, generator=torch.Generator().manual_seed(7))
    b = sample_virtual_outliers(features, k=5, num_candidates=20, generator=torch.Generator().manual_seed(7))
    c = sample_virtual_outliers(features, k=5, num_candidates=20, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.outliers, b.outliers) and torch.equal(a.sources, b.sources)
    assert not torch.equal(a.outliers, c.outliers)


# -- the regularizer ----------------------------------------------------------------------------------
def _huber(x, delta=1.0):
    return 0.5 * x * x if abs(x) < delta else delta * (abs(x) - 0.5 * delta)


def test_energy_and_vor_loss_against_hand_computed_values():
    low = torch.finfo(torch.float32).min
    assert energy(torch.tensor([[1.0, 2.0, 3.0]])).item() == pytest.approx(-math.log(math.e + math.e**2 + math.e**3))
    # a masked column (the dtype's minimum) adds nothing to the energy
    assert energy(torch.tensor([[1.0, 2.0, low]])).item() == pytest.approx(-math.log(math.e + math.e**2))

    logits_id = torch.tensor([[0.0, 0.0, low], [10.0, 10.0, low], [2.0, 0.0, low]])
    logits_ood = torch.tensor([[0.0, 0.0, 0.0], [3.0, 1.0, -1.0]])
    tau_id, tau_ood, lam = -10.0, -0.5, 0.5
    s_id = [-math.log(2), -10 - math.log(2), -math.log(math.exp(2) + 1)]
    s_ood = [-math.log(3), -math.log(math.exp(3) + math.e + math.exp(-1))]
    expected = lam * (
        sum(_huber(max(0.0, s - tau_id)) for s in s_id) / 3 + sum(_huber(max(0.0, tau_ood - s)) for s in s_ood) / 2
    )
    # both Huber branches are exercised: gaps 9.31 (linear), 0.60 (quadratic), 0 (ReLU)
    assert vor_loss(logits_id, logits_ood, tau_id, tau_ood, lam).item() == pytest.approx(expected, rel=1e-6)
    # default thresholds of the paper: -15 / -3, lambda 0.1
    z = torch.tensor([[1.0, -1.0]])
    s = -math.log(math.e + math.exp(-1))
    assert vor_loss(z, z).item() == pytest.approx(0.1 * (_huber(s + 15) + _huber(max(0.0, -3 - s))), rel=1e-6)
    assert vor_loss(z, z[:0]).item() == pytest.approx(0.1 * _huber(s + 15), rel=1e-6)


# -- the callback ---------------------------------------------------------------------------------------
class _Step(NamedTuple):
    task: int
    task_end: bool
    num_seen: int


class _FakeStream(pl.LightningDataModule):
    """Two tasks of three Gaussian classes each in 6 dimensions, one training batch per schedule step."""

    def __init__(self, per_class: int = 30):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        centres = 2.5 * torch.randn(6, 6, generator=g)
        self.y = torch.arange(6).repeat_interleave(per_class)
        self.x = centres[self.y] + torch.randn(len(self.y), 6, generator=g)
        self.tasks = self.y // 3
        self.schedule = [_Step(0, False, 3), _Step(0, True, 3), _Step(1, False, 6), _Step(1, True, 6)]
        self.num_workers = 0

    def task_dataset(self, task):
        keep = self.tasks == task
        return TensorDataset(self.x[keep], self.y[keep])

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=len(self.y) // len(self.schedule), shuffle=False)


class _FakeModule(pl.LightningModule):
    """A linear "backbone" kept frozen in eval mode (as a prompt method's ViT) and a linear head; lr 0,
    so anything that moves comes from the callback."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Linear(6, 8)
        self.head = nn.Linear(8, 6)
        self.backbone.requires_grad_(False)
        self.scale = nn.Parameter(torch.ones(()))  # trainable, not the head: must not move

    def features(self, x):
        return self.backbone(x) * self.scale

    def on_train_start(self):
        self.backbone.eval()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.head(self.features(x)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


class _Probe(pl.Callback):
    """Records, at every task end, what the module looks like (placed before and after the VOR callback)."""

    def __init__(self):
        self.seen = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.datamodule.schedule[batch_idx].task_end:
            self.seen.append({
                "modes": {name: m.training for name, m in pl_module.named_modules()},
                "flags": {name: p.requires_grad for name, p in pl_module.named_parameters()},
                "state": {name: t.detach().clone() for name, t in pl_module.state_dict().items()},
            })  # fmt: skip


def _vor(**kwargs):
    defaults = dict(
        epochs=15,
        optimizer=functools.partial(torch.optim.Adam, lr=0.05),
        batch_size=32,
        k=5,
        num_boundary=5,
        num_candidates=20,
        num_outliers=8,
        tau_id=-6.0,
        tau_ood=-1.0,
        lam=1.0,
        seed=0,
    )
    defaults.update(kwargs)
    return VirtualOutlierRegularization(**defaults)  # fmt: skip


def _fit(callbacks, module=None):
    module = module or _FakeModule()
    trainer = tiny_trainer(callbacks=callbacks, limit_val_batches=0, use_distributed_sampler=False)
    trainer.fit(module, datamodule=_FakeStream())
    return module


def _task_features(module, stream, task):
    ds = stream.task_dataset(task)
    with torch.no_grad():
        return module.features(ds.tensors[0]), ds.tensors[1]


def _vor_of(head, callback, features, labels, num_seen, seed=123):
    from lightning_mtl.continual.base import mask_unseen

    outliers = callback.class_outliers(features, labels, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return vor_loss(mask_unseen(head(features), num_seen), mask_unseen(head(outliers), num_seen),
                        callback.tau_id, callback.tau_ood, callback.lam).item()  # fmt: skip


def test_head_phase_lowers_the_regularized_loss_and_changes_only_the_head():
    before, after = _Probe(), _Probe()
    vor = _vor()
    initial = _FakeModule()
    module = _fit([before, vor, after], _FakeModule())
    stream = _FakeStream()
    assert vor.done_tasks == {0, 1} and len(before.seen) == len(after.seen) == 2
    for b, a in zip(before.seen, after.seen):
        assert a["modes"] == b["modes"] and a["modes"]["backbone"] is False and a["modes"]["head"] is True
        assert a["flags"] == b["flags"]
        for name, value in a["state"].items():
            assert torch.equal(value, b["state"][name]) != name.startswith("head."), name
    # the head phase of task 1 lowers the VOR loss on fresh outliers (another seed) of the task's classes
    features, labels = _task_features(module, stream, 1)
    head_before = nn.Linear(8, 6)
    head_before.load_state_dict({n[5:]: t for n, t in before.seen[1]["state"].items() if n.startswith("head.")})
    loss_before = _vor_of(head_before, vor, features, labels, 6)
    loss_after = _vor_of(module.head, vor, features, labels, 6)
    # ... and below what the same head phase reaches with cross-entropy alone (lam = 0)
    plain = _fit([_vor(lam=0.0)])
    loss_plain = _vor_of(plain.head, vor, features, labels, 6)
    assert loss_after < 0.7 * loss_before and loss_after < 0.85 * loss_plain
    assert vor.history[1]["last_reg"] < 0.7 * vor.history[1]["first_reg"]
    assert vor.history[1]["last_ce"] < 0.2 * vor.history[1]["first_ce"]
    # and nothing but the head ever moved
    for name, value in module.state_dict().items():
        if not name.startswith("head."):
            assert torch.equal(value, initial.state_dict()[name]), name


def test_outliers_rescaled_to_the_feature_norm_of_their_boundary_point():
    g = torch.Generator().manual_seed(0)
    features = 5 * torch.randn(40, 8, generator=g) + 20
    labels = torch.arange(2).repeat_interleave(20)
    raw = _vor(rescale_outliers=True).class_outliers(features, labels, torch.Generator().manual_seed(1))
    unit = _vor(rescale_outliers=False).class_outliers(features, labels, torch.Generator().manual_seed(1))
    assert raw.shape == unit.shape == (16, 8)
    torch.testing.assert_close(F.normalize(raw, dim=1), F.normalize(unit, dim=1))
    ratio = raw.norm(dim=1) / unit.norm(dim=1)
    norms = features.norm(dim=1)
    # each ratio is the norm of one boundary feature of its class (the first 8 outliers: class 0)
    for i, r in enumerate(ratio):
        own = norms[labels == i // 8]
        assert (own - r).abs().min() < 1e-4


def test_same_seed_same_head_and_resume_skips_regularized_tasks():
    a = _fit([_vor(seed=3)])
    b = _fit([_vor(seed=3)])
    c = _fit([_vor(seed=4)])
    assert torch.equal(a.head.weight, b.head.weight) and torch.equal(a.head.bias, b.head.bias)
    assert not torch.equal(a.head.weight, c.head.weight)

    vor = _vor(seed=99)
    vor.load_state_dict(_vor(seed=3).state_dict() | {"done_tasks": [0]})
    assert vor.seed == 3 and vor.done_tasks == {0}
    probe = _Probe()
    _fit([vor, probe])
    assert vor.done_tasks == {0, 1} and set(vor.history) == {1}
    # task 0 was not run again: the head is still the initial one after its task end
    initial = _FakeModule().head.state_dict()
    for name, value in initial.items():
        assert torch.equal(probe.seen[0]["state"][f"head.{name}"], value)


@pytest.mark.parametrize(
    ("limits", "expected"),
    [
        ({}, None),  # the whole stream: every task gets its head phase, nothing to say
        ({"max_steps": 3}, "trainer.max_steps=3"),  # stops one batch before task 1's end
        ({"limit_train_batches": 2}, "trainer.limit_train_batches=2"),
        ({"max_steps": 2, "accumulate_grad_batches": 2}, None),  # 2 optimizer steps are the stream's 4 batches
        ({"max_epochs": 2}, "trainer.max_epochs=2"),  # the stream replayed without head phases
        ({"max_epochs": 2, "max_steps": 4}, None),  # ... unless max_steps ends the run with the stream
    ],
)
def test_a_run_that_misses_a_task_end_or_replays_the_stream_is_named_in_a_warning(limits, expected):
    """The head phase's cosine follows its own epochs; what the Trainer's length decides is which task ends it
    reaches, and a run that stops before one (or runs past the stream) says which setting to change."""
    import warnings

    vor = _vor(epochs=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = tiny_trainer(callbacks=[vor], limit_val_batches=0, use_distributed_sampler=False, **limits)
        trainer.fit(_FakeModule(), datamodule=_FakeStream())
    said = [str(w.message) for w in caught if "VirtualOutlierRegularization" in str(w.message)]
    if expected is None:
        assert said == [] and vor.done_tasks == {0, 1}
        return
    assert len(said) == 1 and expected in said[0], said
    if "max_epochs" in expected:
        assert "Set trainer.max_epochs to 1" in said[0] and vor.done_tasks == {0, 1}
    else:
        assert "tasks [1]" in said[0] and vor.done_tasks == {0}  # task 1's end was never reached
        assert f"Set {expected.split('=')[0]} to" in said[0]


def test_bad_setups_are_clear_errors():
    with pytest.raises(ValueError, match="epochs must be positive"):
        VirtualOutlierRegularization(epochs=0)

    class NoStream(pl.LightningDataModule):
        def train_dataloader(self):
            return DataLoader(TensorDataset(torch.zeros(4, 6), torch.zeros(4, dtype=torch.long)), batch_size=2)

    with pytest.raises(ValueError, match="schedule"):
        tiny_trainer(callbacks=[_vor()]).fit(_FakeModule(), datamodule=NoStream())


class _RanksAgree(pl.Callback):
    def __init__(self, expected):
        self.expected = expected

    def on_train_end(self, trainer, pl_module):
        flat = torch.cat([p.detach().flatten() for p in pl_module.head.parameters()])
        gathered = pl_module.all_gather(flat)
        assert torch.equal(gathered[0], gathered[1]), "the head differs between ranks"
        torch.testing.assert_close(flat, self.expected, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_ddp_ranks_share_features_outliers_and_head():
    """2 gloo processes, each extracting half of every task: the gathered features give every rank the
    single-process outliers and head."""
    single = _fit([_vor()])
    expected = torch.cat([p.detach().flatten() for p in single.head.parameters()])
    trainer = tiny_trainer(strategy=SpawnDDP(), devices=2, limit_val_batches=0, use_distributed_sampler=False,
                           callbacks=[_vor(), _RanksAgree(expected)])  # fmt: skip
    trainer.fit(_FakeModule(), datamodule=_FakeStream())
