"""BarlowTwins / MixedBarlowTwins modules: the steps, the draws, the schedule, training from Python."""

from __future__ import annotations

import copy
import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_mtl.architectures import DigitsCNN
from lightning_mtl.datamodules.digits import Digits
from lightning_mtl.ssl import BarlowTwins, MixedBarlowTwins, SSLAugmentation, TwoViews
from lightning_mtl.ssl.barlow_twins import split_views, warmup_cosine_factor
from lightning_mtl.ssl.losses import barlow_twins_loss
from tests.fixtures.trainers import tiny_trainer


def _backbone():
    torch.manual_seed(0)
    return DigitsCNN(in_channels=1, channels=(4, 8), out_features=16)


def _views(n=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 1, 8, 8, generator=generator) for _ in range(2)], torch.randint(
        0, 10, (n,), generator=generator
    )


def _grads(module):
    return [p.grad.clone() for p in module.parameters()]


def test_training_step_is_the_loss_of_the_two_embeddings_and_returns_detached_features():
    module = BarlowTwins(_backbone(), embedding_dim=12, projector_hidden=(10,), lambda_bt=0.1)
    views, labels = _views()
    out = module.training_step((views, labels), 0)
    _, z_a = module.embed(views[0])
    _, z_b = module.embed(views[1])
    assert torch.allclose(out["loss"], barlow_twins_loss(z_a, z_b, 0.1).loss)
    assert out["features"].shape == (16, 16) and not out["features"].requires_grad


def test_lambda_reg_zero_gives_plain_barlow_twins_step():
    views, labels = _views()
    plain = BarlowTwins(_backbone(), embedding_dim=12, projector_hidden=(10,))
    mixed = MixedBarlowTwins(_backbone(), embedding_dim=12, projector_hidden=(10,), lambda_reg=0.0)
    mixed.load_state_dict(plain.state_dict())
    loss_plain = plain.training_step((views, labels), 0)["loss"]
    loss_mixed = mixed.training_step((views, labels), 0)["loss"]
    assert torch.equal(loss_plain, loss_mixed)
    loss_plain.backward(), loss_mixed.backward()
    for a, b in zip(_grads(plain), _grads(mixed)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("alpha", [1.0, 0.0])
def test_module_mixes_inputs_so_that_alpha_one_and_zero_meet_the_targets(monkeypatch, alpha):
    """alpha = 1: the mixed input is view A; alpha = 0: it is view B permuted. BatchNorm's batch statistics
    do not depend on the order, so the mixed embedding is exactly A's (B's, permuted) and the regularizer
    vanishes; with a mix in between it does not."""
    views, labels = _views(n=32)
    module = MixedBarlowTwins(_backbone(), embedding_dim=12, projector_hidden=(10,), lambda_reg=4.0)
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(7))
    monkeypatch.setattr(module, "draw_mix", lambda n, step, batch_idx, rank: (alpha, perm))
    terms, _ = module.compute_loss(views, 0)
    assert float(terms.loss_reg.detach()) == pytest.approx(0.0, abs=1e-8)
    monkeypatch.setattr(module, "draw_mix", lambda n, step, batch_idx, rank: (0.5, perm))
    assert float(module.compute_loss(views, 0)[0].loss_reg.detach()) > 1e-4


def test_draws_are_seeded_by_step_and_alpha_is_shared_by_the_ranks():
    module = MixedBarlowTwins(_backbone(), embedding_dim=8, projector_hidden=(), seed=3)
    a0, p0 = module.draw_mix(64, step=5, batch_idx=5, rank=0)
    a1, p1 = module.draw_mix(64, step=5, batch_idx=5, rank=1)
    assert a0 == a1 and not torch.equal(p0, p1)
    assert sorted(p0.tolist()) == list(range(64))
    again = module.draw_mix(64, step=5, batch_idx=5, rank=0)
    assert again[0] == a0 and torch.equal(again[1], p0)
    assert module.draw_mix(64, step=6, batch_idx=6, rank=0)[0] != a0
    alphas = [module.draw_mix(8, s, s, 0)[0] for s in range(2000)]
    assert 0.45 < sum(alphas) / len(alphas) < 0.55 and min(alphas) < 0.02 and max(alphas) > 0.98  # Beta(1, 1)


def test_warmup_cosine_schedule():
    assert warmup_cosine_factor(0, 10, 100) == pytest.approx(0.1)
    assert warmup_cosine_factor(9, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine_factor(10, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine_factor(55, 10, 100, 0.0) == pytest.approx(0.5)
    assert warmup_cosine_factor(100, 10, 100, 1e-3) == pytest.approx(1e-3)


def test_single_view_training_batch_is_a_clear_error():
    module = BarlowTwins(_backbone(), embedding_dim=8, projector_hidden=())
    x, y = _views()
    with pytest.raises(ValueError, match="two augmented views"):
        module.training_step((x[0], y), 0)
    with pytest.raises(TypeError, match="TwoViews"):
        split_views(("not", "a batch", "at all"))


def test_split_views_accepts_the_batch_layouts():
    (a, b), y = _views()
    assert split_views(((a, b), y))[0][1] is b
    assert split_views((a, y))[0] == [a]
    assert split_views((a, {"digit": y}))[1] is y
    views, labels = split_views((a, b))
    assert len(views) == 2 and labels is None


def _digits(**kwargs):
    aug = SSLAugmentation(
        crop_size=8, crop_scale=(0.6, 1.0), hflip_p=0.0, color_jitter=(0.4, 0.4, 0.0, 0.0), grayscale_p=0.0
    )
    return Digits(as_dict=False, batch_size=64, train_transform=TwoViews(aug), **kwargs)


@pytest.mark.parametrize("cls", [BarlowTwins, MixedBarlowTwins])
def test_trains_under_the_trainer_with_the_warmup_cosine_schedule(cls):
    module = cls(_backbone(), embedding_dim=16, projector_hidden=(16,), warmup_epochs=1,
                 optimizer=lambda p: torch.optim.Adam(p, lr=0.01))  # fmt: skip
    start = copy.deepcopy(module.state_dict())
    trainer = tiny_trainer(max_epochs=2, limit_train_batches=4, limit_val_batches=1)
    trainer.fit(module, datamodule=_digits())
    assert trainer.global_step == 8
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(0.01 * warmup_cosine_factor(8, 4, 8, 1e-3))  # the LR of the step after the last
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    changed = [k for k, v in module.state_dict().items() if v.is_floating_point() and not torch.equal(v, start[k])]
    assert any(k.startswith("backbone.") for k in changed)
    if cls is MixedBarlowTwins:
        assert "train/loss_reg" in trainer.callback_metrics and "train/alpha" in trainer.callback_metrics


def test_regularizer_warmup_ramps_over_epochs():
    module = MixedBarlowTwins(_backbone(), embedding_dim=8, projector_hidden=(), reg_warmup_epochs=2,
                              warmup_epochs=0, cosine=False)  # fmt: skip
    seen = []

    class Spy(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(pl_module.reg_scale(batch_idx))

    tiny_trainer(max_epochs=3, limit_train_batches=2, limit_val_batches=0, callbacks=[Spy()]).fit(
        module, datamodule=_digits()
    )
    assert seen == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 1.0])


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="lambda_reg"):
        MixedBarlowTwins(_backbone(), lambda_reg=-1)
    with pytest.raises(ValueError, match="mix_beta"):
        MixedBarlowTwins(_backbone(), mix_beta=(0.0, 1.0))
    with pytest.raises(ValueError, match="feature_dim"):
        BarlowTwins(nn.Flatten())


@pytest.mark.parametrize("precision, accumulate", [("bf16-mixed", 1), ("32-true", 2)])
def test_mixed_precision_and_accumulation(precision, accumulate):
    """bf16 autocast: the loss is still computed in float32; accumulation: each micro-batch is its own
    Barlow Twins batch (standardized on its own, its own alpha and permutation)."""
    module = MixedBarlowTwins(_backbone(), embedding_dim=16, projector_hidden=(16,), warmup_epochs=0)
    trainer = tiny_trainer(max_epochs=1, limit_train_batches=4, limit_val_batches=0, precision=precision,
                           accumulate_grad_batches=accumulate)  # fmt: skip
    trainer.fit(module, datamodule=_digits())
    assert trainer.global_step == 4 // accumulate
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
