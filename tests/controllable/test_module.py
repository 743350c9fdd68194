"""ControllableMultiTaskModule: the sandwich step equals a hand-written one, loss weightings weight every
configuration alike, gradient aggregators are refused, resume is bit-exact (sampler included), bf16 works and
DDP ranks draw the same configurations."""

from __future__ import annotations

import copy
import functools

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision

from lightning_mtl import ClassificationTask
from lightning_mtl.aggregators import create_aggregator, list_aggregators
from lightning_mtl.controllable import (
    ConfigurationSampler,
    ControllableMultiTaskModule,
    SlimmableDigitsCNN,
    set_width,
)
from tests.fixtures.ddp import SpawnDDP
from tests.fixtures.trainers import one_thread, tiny_multidigits, tiny_trainer  # noqa: F401  # one_thread: autouse

pytestmark = pytest.mark.filterwarnings(r"ignore:You are trying to `self.log\(\)`")
LOSS_WEIGHTINGS = [n for n in list_aggregators() if create_aggregator(n).kind == "loss"]


def _module(**kwargs):
    torch.manual_seed(0)
    defaults = dict(
        encoder=SlimmableDigitsCNN(channels=(8, 16), out_features=16),
        tasks={"left": ClassificationTask(10, weight=0.7), "right": ClassificationTask(10)},
        decoder_hidden=12,
        optimizer=functools.partial(torch.optim.SGD, lr=0.1),
    )
    defaults.update(kwargs)
    return ControllableMultiTaskModule(**defaults)


def _batch(seed=0, n=8):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 10, 10, generator=generator)
    labels = {t: torch.randint(0, 10, (n,), generator=generator) for t in ("left", "right")}
    return x, labels


def test_sandwich_step_equals_hand_written_loss_and_gradients():
    module = _module(kd_weight=0.5, num_random=2)
    module.train()
    reference = copy.deepcopy(module)
    x, y = _batch()
    loss = module.training_step((x, y), 0)
    configs = module.last_configurations
    assert len(configs) == 4

    # by hand: the task losses of every configuration (fixed weights 0.7 and 1) plus 0.5 * mse to the widest features
    total, teacher = 0.0, None
    for config in configs:
        set_width(reference.encoder, config["encoder"])
        features = reference.encoder(x)
        for name, weight in (("left", 0.7), ("right", 1.0)):
            set_width(reference.heads[name], config[name])
            total = total + weight * F.cross_entropy(reference.heads[name](features), y[name])
        if teacher is None:
            teacher = features.detach()
        else:
            total = total + 0.5 * ((features - teacher[:, : features.shape[1]]) ** 2).mean()
    assert torch.allclose(loss, total, rtol=1e-6, atol=1e-7)
    loss.backward()
    total.backward()
    for (name, a), b in zip(module.named_parameters(), reference.parameters()):
        if a.grad is None:
            assert b.grad is None, name
        else:
            assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7), name
    assert module.configuration == module.sampler.widest()  # forward and validation go back to the widest


def test_sandwich_rule_widest_narrowest_then_random_draws_from_the_width_sets():
    sampler = ConfigurationSampler(("a", "b"), (0.25, 0.5, 1.0), (0.5, 1.0), num_random=3, seed=1)
    seen = set()
    for _ in range(40):
        configs = sampler.sandwich()
        assert len(configs) == 5
        assert configs[0] == {"encoder": 1.0, "a": 1.0, "b": 1.0}
        assert configs[1] == {"encoder": 0.25, "a": 0.5, "b": 0.5}
        for config in configs[2:]:
            assert config["encoder"] in (0.25, 0.5, 1.0) and config["a"] in (0.5, 1.0) and config["b"] in (0.5, 1.0)
            seen.add(tuple(config.values()))
    assert len(seen) == 12  # every combination of 3 encoder and 2 x 2 decoder widths shows up
    again = ConfigurationSampler(("a", "b"), (0.25, 0.5, 1.0), (0.5, 1.0), num_random=3, seed=1)
    again.load_state_dict(sampler.state_dict())
    assert again.sandwich() == sampler.sandwich()


@pytest.mark.parametrize("name", [n for n in LOSS_WEIGHTINGS if n != "gradnorm"])
def test_loss_weighting_weights_every_configuration_with_the_widest_configurations_weights(name):
    """The weighting is called once, on the widest configuration's losses (its objective is what a copy of it
    gives there); every other configuration adds weights . losses + kd_weight * kd. (GradNorm needs the task
    gradient norms for its call, so a copy cannot replay it; it runs in the fit test below.)"""
    kwargs = {"seed": 0} if name == "rlw" else {}
    module = _module(aggregator=create_aggregator(name, **kwargs), kd_weight=0.0, num_random=1)
    replay = copy.deepcopy(module)
    x, y = _batch(1)
    loss = module.training_step((x, y), 0)
    weights = module.aggregator.last_weights
    expected = 0.0
    for i, config in enumerate(module.last_configurations):
        replay.set_configuration(config)
        preds = replay(x)
        losses = torch.stack([F.cross_entropy(preds[t], y[t]) for t in ("left", "right")])
        expected = expected + (replay.aggregator(losses) if i == 0 else (weights * losses).sum())
    assert torch.allclose(loss, expected, rtol=1e-5, atol=1e-6)


def test_every_loss_weighting_trains_a_few_steps():
    for name in LOSS_WEIGHTINGS:
        module = _module(aggregator=name)
        before = [p.detach().clone() for p in module.encoder.parameters()]
        trainer = tiny_trainer(max_steps=2, limit_val_batches=1)
        trainer.fit(module, datamodule=tiny_multidigits(batch_size=16))
        assert torch.isfinite(trainer.callback_metrics["train/loss"]), name
        assert any(not torch.equal(a, b) for a, b in zip(before, module.encoder.parameters())), name


@pytest.mark.parametrize("name", ["pcgrad", "mgda", "upgrad"])
def test_gradient_aggregators_are_refused(name):
    with pytest.raises(ValueError, match="use a loss weighting"):
        _module(aggregator=name)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="not slimmable"):
        _module(encoder=torch.nn.Linear(100, 4))
    with pytest.raises(ValueError, match="must contain slimmable layers"):
        _module(tasks={"left": ClassificationTask(10, head=torch.nn.Linear(16, 10))})
    module = _module()
    with pytest.raises(ValueError, match="exactly the keys"):
        module.set_configuration({"encoder": 1.0, "left": 1.0})
    with pytest.raises(ValueError, match="not one of the trained widths"):
        module.set_configuration({"encoder": 0.3, "left": 1.0, "right": 1.0})


def _fit(folder, max_epochs, ckpt_path=None, seed=0):
    pl.seed_everything(seed)
    module = _module(aggregator="dwa", seed=3)
    trainer = tiny_trainer(
        max_epochs=max_epochs, deterministic=True, enable_checkpointing=True, limit_val_batches=1,
        callbacks=[ModelCheckpoint(dirpath=folder, save_top_k=-1, filename="{epoch}")],
    )  # fmt: skip
    trainer.fit(module, datamodule=tiny_multidigits(num_train=96, batch_size=32), ckpt_path=ckpt_path)
    return module


def test_resume_is_bit_exact_including_the_configuration_sampler(tmp_path):
    full = _fit(tmp_path / "full", max_epochs=3)
    _fit(tmp_path / "part", max_epochs=1)
    resumed = _fit(tmp_path / "resumed", max_epochs=3, ckpt_path=tmp_path / "part/epoch=0.ckpt", seed=123)
    assert full.sampler.calls == resumed.sampler.calls == 9
    assert full.last_configurations == resumed.last_configurations
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        same = torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
        assert same, f"{name} differs after resume"


def test_bf16_mixed_step_is_close_to_the_full_precision_step():
    updated = {}
    for precision in ("32-true", "bf16-mixed"):
        module = _module(num_random=1)
        trainer = tiny_trainer(max_steps=1, limit_val_batches=0, precision=precision)
        trainer.fit(module, datamodule=tiny_multidigits(batch_size=16))
        updated[precision] = torch.cat([p.detach().flatten() for p in module.parameters()])
    # bf16 keeps 8 bits of mantissa: one SGD step moves the weights by lr * grad, so the two updates agree to
    # about 1% of the weights' scale
    assert torch.allclose(updated["bf16-mixed"], updated["32-true"], atol=2e-2)


def _one_step_update(**trainer_kwargs):
    """The parameter change of one sandwich step (SGD, so a loss scale left in the gradients would show), and
    the dtype of the encoder's features during it."""
    module = _module(num_random=1)
    before = torch.cat([p.detach().float().flatten() for p in module.parameters()])
    seen = []
    module.encoder.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    trainer = tiny_trainer(max_steps=1, limit_val_batches=0, **trainer_kwargs)
    trainer.fit(module, datamodule=tiny_multidigits(batch_size=16))
    return torch.cat([p.detach().float().flatten() for p in module.parameters()]) - before, seen, trainer


# tolerance, as a fraction of the largest fp32 update: mixed precision keeps fp32 weights and rounds the
# activations and gradients to 8 (bf16) or 11 (fp16) bits, ~0.4% per operation over a few layers; true half
# precision also stores the weights in half, whose rounding (2^-9 of weights up to ~0.5) adds ~2% more
@pytest.mark.parametrize(
    "precision, dtype, tolerance",
    [("bf16-mixed", torch.bfloat16, 0.05), ("16-mixed", torch.float16, 0.05),
     ("bf16-true", torch.bfloat16, 0.1), ("16-true", torch.float16, 0.1)],
)  # fmt: skip
def test_every_precision_flag_takes_the_full_precision_step(precision, dtype, tolerance):
    reference, _, _ = _one_step_update(precision="32-true")
    if precision == "16-mixed":
        # on a CPU Lightning turns precision="16-mixed" into bf16; the fp16 plugin with its GradScaler, as on a
        # GPU, is built by hand: the summed loss must pass through the scaler and come back unscaled
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
        update, seen, trainer = _one_step_update(plugins=[MixedPrecision("16-mixed", "cpu", scaler)])
        assert trainer.precision_plugin.scaler is scaler
        assert scaler.get_scale() == 2.0**16  # the step was taken (a skipped, non-finite one halves the scale)
    else:
        update, seen, _ = _one_step_update(precision=precision)
    assert seen and set(seen) == {dtype}  # every configuration's encoder ran in that precision
    scale = reference.abs().max()
    assert scale > 0
    assert (update - reference).abs().max() <= tolerance * scale


class _ConfigurationsAgree(pl.Callback):
    """Every step, both ranks drew the same configurations; at the end, the parameters are equal."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        drawn = torch.tensor([[c[k] for k in sorted(c)] for c in pl_module.last_configurations])
        gathered = pl_module.all_gather(drawn)
        assert torch.equal(gathered[0], gathered[1]), "ranks drew different configurations"

    def on_train_end(self, trainer, pl_module):
        flat = torch.cat([p.detach().flatten() for p in pl_module.parameters()])  # buffers: per-rank BN statistics
        gathered = pl_module.all_gather(flat)
        assert torch.equal(gathered[0], gathered[1]), "parameters differ between ranks"


@pytest.mark.slow
def test_ddp_ranks_draw_the_same_configurations_and_stay_identical():
    module = _module(num_random=2)
    trainer = tiny_trainer(strategy=SpawnDDP(), devices=2, max_steps=4, limit_val_batches=1,
                           callbacks=[_ConfigurationsAgree()])  # fmt: skip
    trainer.fit(module, datamodule=tiny_multidigits(batch_size=8))
