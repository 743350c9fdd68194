"""aTLAS: the merged encoder at chosen coefficients, the coefficient gradient against <dL/dtheta_b, tau_b>,
the objectives against hand-written losses, and the Lightning flags (resume, DDP, precision)."""

from __future__ import annotations

import copy
import functools

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from lightning_mtl import MISSING_LABEL
from lightning_mtl.datamodules import DigitsTasks
from lightning_mtl.merging import ATLAS
from lightning_mtl.merging.atlas import parse_granularity
from tests.fixtures.ddp import SpawnDDP
from tests.fixtures.merging_learned import SaveRankStep, expert_state, head, pretrained, task_vector
from tests.fixtures.trainers import one_thread, tiny_trainer  # noqa: F401  (one torch thread for this module)

TASKS = ("rotate90", "parity")
GRANULARITIES = ["task", "block", "partition:3"]


def _atlas(granularity="block", objective="addition", **kwargs):
    base = pretrained()
    experts = {"rotate90": expert_state(base, 1), "parity": expert_state(base, 2)}
    heads = {"rotate90": head(10, 3), "parity": head(2, 4), "identity": head(10, 5)}
    kwargs.setdefault("optimizer", functools.partial(torch.optim.SGD, lr=0.5))
    if objective != "negation":
        kwargs.setdefault("targets", list(TASKS))
    module = ATLAS(base, experts=experts, heads=heads, granularity=granularity, objective=objective, **kwargs)
    return module, base, experts


def _batch(n=12, seed=0):
    """n samples per task, task-balanced, labels missing for the other tasks (the DigitsTasks layout)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * n, 1, 8, 8, generator=generator)
    missing = torch.full((n,), MISSING_LABEL)
    y = {
        "rotate90": torch.cat([torch.randint(0, 10, (n,), generator=generator), missing, missing]),
        "parity": torch.cat([missing, torch.randint(0, 2, (n,), generator=generator), missing]),
        "identity": torch.cat([missing, missing, torch.randint(0, 10, (n,), generator=generator)]),
    }
    return x, y


def test_blocks_cover_every_floating_entry():
    module, base, _ = _atlas("partition:2")
    names = set(module.block_names)
    assert names == {"0.weight", "0.bias", "1.weight", "1.bias", "5.weight", "5.bias"}
    # the running statistics are merged too, with each task's mean coefficient
    assert {"1.running_mean", "1.running_var"} <= set(module.entry_names)
    assert "1.num_batches_tracked" not in module.entry_names
    # every block has its own seeded partition into 2 parts, the same when rebuilt
    again, _, _ = _atlas("partition:2")
    for b in range(len(module.block_names)):
        assert torch.equal(getattr(module, f"_part{b}"), getattr(again, f"_part{b}"))
    assert module.coefficients.shape == (2, len(names), 2)
    assert [n for n, p in module.named_parameters() if p.requires_grad] == ["coefficients"]


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_zero_coefficients_give_theta0_bit_for_bit(granularity):
    module, base, _ = _atlas(granularity)
    x, _ = _batch()
    assert torch.equal(module(x), base(x))


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_one_hot_coefficient_gives_the_expert(granularity):
    module, base, experts = _atlas(granularity)
    with torch.no_grad():
        module.coefficients[0] = 1.0
    expert = copy.deepcopy(base)
    expert.load_state_dict(experts["rotate90"])
    x, _ = _batch()
    # theta_0 + (theta_1 - theta_0) rounds once per entry: float32 agreement, not bit equality
    assert torch.allclose(module(x), expert(x), atol=1e-5)
    merged = module.merged_state_dict()
    for name, value in experts["rotate90"].items():
        assert torch.allclose(merged[name].float(), value.float(), atol=1e-6), name


def test_merged_running_variance_never_goes_negative():
    module, base, _ = _atlas("block")
    with torch.no_grad():
        module.coefficients.fill_(-5.0)  # far off the segment between theta_0 and the experts
    merged = module.merged_state()
    assert bool((merged["1.running_var"] >= 0).all())
    unclamped = base.state_dict()["1.running_var"] - 5.0 * sum(
        getattr(module, f"_tau{e}")[t]
        for t in range(2)
        for e, n in enumerate(module.entry_names)
        if n == "1.running_var"
    )
    assert bool((unclamped < 0).any())  # the case the clamp is for
    assert bool(module(_batch()[0]).isfinite().all())


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_coefficient_gradient_is_inner_product_of_weight_gradient_and_task_vector(granularity):
    module, base, experts = _atlas(granularity)
    with torch.no_grad():
        module.coefficients.copy_(
            0.3 * torch.randn(module.coefficients.shape, generator=torch.Generator().manual_seed(7))
        )
    batch = _batch()
    module.training_step(batch, 0).backward()
    got = module.coefficients.grad

    # reference: the gradient of the same loss w.r.t. the merged weights, contracted with each task vector
    merged = {k: v.detach().requires_grad_(k in module.block_names) for k, v in module.merged_state().items()}
    x, y = batch
    features = functional_call(base, merged, (x,))
    merged = {k: merged[k] for k in module.block_names}
    loss = sum(F.cross_entropy(module.heads[t](features[y[t] >= 0]), y[t][y[t] >= 0]) for t in TASKS)
    grads = torch.autograd.grad(loss, list(merged.values()))
    kind, parts = parse_granularity(granularity)
    expected = torch.zeros_like(got)
    taus = [task_vector(base, experts[t]) for t in TASKS]
    for b, (name, g) in enumerate(zip(merged, grads)):
        for t, tau in enumerate(taus):
            product = (g * tau[name]).flatten()
            if kind == "partition":
                part = getattr(module, f"_part{b}")
                for k in range(parts):
                    expected[t, b, k] += product[part == k].sum()
            else:
                expected[t, b if kind == "block" else 0, 0] += product.sum()
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6)
    if kind == "block":  # every block, biases and BatchNorm included, gets a gradient
        assert bool((got != 0).all())


def test_negation_and_fewshot_objectives():
    module, base, _ = _atlas(objective="negation", targets=["rotate90"], control="identity")
    batch = _batch()
    x, y = batch
    with torch.no_grad():
        module.coefficients.fill_(0.2)
        features = module(x)
        ce = {
            t: F.cross_entropy(module.heads[t](features[y[t] >= 0]), y[t][y[t] >= 0]) for t in ("rotate90", "identity")
        }
        assert torch.allclose(module.training_step(batch, 0), ce["identity"] - ce["rotate90"])
    with pytest.raises(ValueError, match="needs `control`"):
        _atlas(objective="negation")
    with pytest.raises(ValueError, match="leave the targets' own vectors out"):
        _atlas(objective="fewshot", targets=["rotate90"])
    few, _, _ = _atlas(objective="fewshot", targets=["identity"], pool=["rotate90", "parity"])
    features = few(x)
    rows = y["identity"] >= 0
    assert torch.allclose(
        few.training_step(batch, 0), F.cross_entropy(few.heads["identity"](features[rows]), y["identity"][rows])
    )


def test_tta_loss_is_fixmatch_on_trusted_pseudo_labels():
    module, _, _ = _atlas(objective="tta", targets=["rotate90"], confidence=0.0)
    x, _ = _batch()
    with torch.no_grad():
        module.coefficients.fill_(0.1)
        strong = module._strong_view(x)
        assert torch.equal(strong, module._strong_view(x))  # seeded by (seed, step)
        assert not torch.equal(strong, x)
        pseudo = module.heads["rotate90"](module(x)).argmax(-1)
        expected = F.cross_entropy(module.heads["rotate90"](module(strong)), pseudo)
        assert torch.allclose(module.training_step((x, {}), 0), expected, atol=1e-6)
        module.confidence = 1.01  # nothing is trusted: no loss
        assert float(module.training_step((x, {}), 0)) == 0.0


def test_bad_input_gets_one_sentence():
    base = pretrained()
    with pytest.raises(ValueError, match="granularity must be"):
        ATLAS(base, vectors={"a": {}}, granularity="partition:1")
    with pytest.raises(KeyError, match="entry 'nope' is not a floating entry"):
        ATLAS(base, vectors={"a": {"nope": torch.zeros(1)}})
    with pytest.raises(ValueError, match=r"entry '0.weight' has shape \(1,\)"):
        ATLAS(base, vectors={"a": {"0.weight": torch.zeros(1)}})
    with pytest.raises(KeyError, match="pool names task vector 'b'"):
        ATLAS(base, vectors={"a": {}}, pool=["b"])
    with pytest.raises(KeyError, match="task 'a' has no head"):
        ATLAS(base, vectors={"a": {}}, targets=["a"])
    with pytest.raises(ValueError, match="needs a target task with a head"):
        ATLAS(base, vectors={"a": {}})


# -- through the Trainer ---------------------------------------------------------------------------------------
def _data():
    return DigitsTasks(list(TASKS), batch_size=16)


def _fit(module, tmp_path=None, ckpt_path=None, **kwargs):
    kwargs.setdefault("max_epochs", 1)
    trainer = tiny_trainer(
        limit_train_batches=3, limit_val_batches=2, num_sanity_val_steps=0, deterministic=True, **kwargs
    )
    trainer.fit(module, datamodule=_data(), ckpt_path=ckpt_path)
    return trainer


def test_a_step_changes_only_the_coefficients():
    module, _, _ = _atlas("block")
    before = copy.deepcopy(module.state_dict())
    taus = [getattr(module, f"_tau{b}").clone() for b in range(len(module.block_names))]
    trainer = _fit(module)
    after = module.state_dict()
    for key, value in before.items():
        if key == "coefficients":
            assert not torch.equal(value, after[key])
        else:
            assert torch.equal(value, after[key]), key
    assert all(torch.equal(t, getattr(module, f"_tau{b}")) for b, t in enumerate(taus))
    assert "val/mean/acc" in trainer.callback_metrics and "val/rotate90/acc" in trainer.callback_metrics


def test_normalised_accuracy_is_accuracy_over_expert_accuracy():
    module, _, _ = _atlas("task", expert_accuracy={"rotate90": 0.5, "parity": 0.8})
    trainer = tiny_trainer()  # the whole validation split: rotate90's images come first, then parity's
    metrics = trainer.validate(module, datamodule=_data(), verbose=False)[0]
    assert metrics["val/rotate90/norm_acc"] == pytest.approx(metrics["val/rotate90/acc"] / 0.5)
    mean = (metrics["val/rotate90/acc"] / 0.5 + metrics["val/parity/acc"] / 0.8) / 2
    assert metrics["val/mean/norm_acc"] == pytest.approx(mean)


@pytest.mark.parametrize("granularity", ["block", "partition:2"])
def test_resume_from_a_mid_training_checkpoint_is_bit_exact(tmp_path, granularity):
    pl.seed_everything(0)
    straight, _, _ = _atlas(granularity, optimizer=functools.partial(torch.optim.AdamW, lr=0.01, weight_decay=0.1))
    _fit(straight, max_epochs=2)

    first, _, _ = _atlas(granularity, optimizer=functools.partial(torch.optim.AdamW, lr=0.01, weight_decay=0.1))
    trainer = _fit(first)
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    resumed, _, _ = _atlas(granularity, optimizer=functools.partial(torch.optim.AdamW, lr=0.01, weight_decay=0.1))
    _fit(resumed, ckpt_path=tmp_path / "mid.ckpt", max_epochs=2)
    assert not torch.equal(first.coefficients, straight.coefficients)
    assert torch.equal(resumed.coefficients, straight.coefficients)


def test_bf16_mixed_trains_and_true_half_is_refused():
    module, _, _ = _atlas("block")
    _fit(module, precision="bf16-mixed")
    assert module.coefficients.dtype == torch.float32
    assert bool(module.coefficients.ne(0).any()) and bool(module.coefficients.isfinite().all())
    with pytest.raises(ValueError, match="precision='16-mixed' or 'bf16-mixed' instead of precision='bf16-true'"):
        _fit(_atlas("block")[0], precision="bf16-true")


@pytest.mark.slow
def test_ddp_step_equals_the_single_process_step_on_the_concatenated_batch(tmp_path):
    module, _, _ = _atlas("partition:2")
    start = copy.deepcopy(module)
    trainer = tiny_trainer(strategy=SpawnDDP(), devices=2, limit_train_batches=1, limit_val_batches=0,
                           num_sanity_val_steps=0, callbacks=[SaveRankStep(tmp_path)])  # fmt: skip
    trainer.fit(module, datamodule=_data())
    ranks = [torch.load(tmp_path / f"params_rank{r}.pt")[0] for r in (0, 1)]  # the coefficients
    assert torch.equal(ranks[0], ranks[1]), "coefficients differ between ranks"

    parts = [torch.load(tmp_path / f"batch_rank{r}.pt") for r in (0, 1)]
    for part in parts:  # each rank holds the same number of samples of each task
        assert [int((part[1][t] >= 0).sum()) for t in TASKS] == [8, 8]
    x = torch.cat([p[0] for p in parts])
    y = {t: torch.cat([p[1][t] for p in parts]) for t in TASKS}
    optimizer = torch.optim.SGD([start.coefficients], lr=0.5)
    start.training_step((x, y), 0).backward()
    optimizer.step()
    assert torch.allclose(ranks[0], start.coefficients.detach(), atol=1e-6)


@pytest.mark.slow
def test_the_merging_recipes_run_through_the_cli(tmp_path):
    """pretrain.yaml -> finetune.yaml + two task fragments -> atlas.yaml and grafting.yaml, each a short fit
    in the test's folder (the recipes' relative paths land there), chained by the checkpoints they write."""
    import json
    from pathlib import Path

    from lightning_mtl.cli import main
    from lightning_mtl.merging import load_mask

    recipes = Path(__file__).resolve().parents[2] / "configs" / "merging"
    short = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=2",
             "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]  # fmt: skip
    main(["fit", "--config", str(recipes / "pretrain.yaml"), *short])
    assert Path("runs/merging/pretrain/best.ckpt").is_file()
    for task in TASKS:
        main(
            [
                "fit",
                "--config",
                str(recipes / "finetune.yaml"),
                "--config",
                str(recipes / "tasks" / f"{task}.yaml"),
                *short,
            ]
        )
    experts = {t: f"runs/merging/experts/{t}/best.ckpt" for t in TASKS}
    cli = main(["fit", "--config", str(recipes / "atlas.yaml"), "--model.init_args.experts", json.dumps(experts),
                "--data.init_args.tasks", json.dumps(list(TASKS)), "--data.init_args.batch_size=32", *short])  # fmt: skip
    assert isinstance(cli.model, ATLAS) and cli.model.pool == TASKS
    assert bool(cli.model.coefficients.ne(0).any()) and Path("runs/merging/atlas/best.ckpt").is_file()
    cli = main(["fit", "--config", str(recipes / "grafting.yaml"), *short])
    assert Path("runs/merging/grafting/rotate90.mask").is_file()
    assert load_mask("runs/merging/grafting/rotate90.mask").keys() == cli.model.best_mask.keys()


def _fp16_mixed():
    """Lightning's 16-mixed (float16 autocast and a GradScaler) on the CPU: the flag alone becomes bf16-mixed
    there, so the plugin is built by hand; 2**10 is the scaler's factor on the loss."""
    from lightning.pytorch.plugins import MixedPrecision

    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))


def _clipped_step(precision_plugin=None, clip=1e-3):
    module, _, _ = _atlas("block", optimizer=functools.partial(torch.optim.SGD, lr=1.0))
    start = module.coefficients.detach().clone()
    plugins = [precision_plugin] if precision_plugin is not None else None
    trainer = _fit(module, max_steps=1, gradient_clip_val=clip, plugins=plugins)
    return module, start, trainer


def test_16_mixed_clips_the_unscaled_gradient():
    """The official code clips the *scaled* gradients (a threshold of clip / scale); here Lightning unscales
    first, so one SGD step under 16-mixed moves the coefficients by lr * clip along -g / |g|, as in float32;
    clipping the scaled gradients would move them 2**10 times less."""
    reference, start, _ = _clipped_step()
    module, _, trainer = _clipped_step(_fp16_mixed())
    assert str(trainer.precision) == "16-mixed"
    step32 = reference.coefficients.detach() - start
    step16 = module.coefficients.detach() - start
    assert float(step32.norm()) == pytest.approx(1e-3, rel=1e-4)  # the clip binds: |g| >> 1e-3
    assert float(step16.norm()) == pytest.approx(1e-3, rel=1e-2)
    cosine = F.cosine_similarity(step16.flatten(), step32.flatten(), dim=0)
    assert float(cosine) > 0.999  # the same direction to float16 rounding


def test_16_mixed_with_clipping_refuses_an_optimizer_that_unscales_itself():
    module, _, _ = _atlas("block", optimizer=functools.partial(torch.optim.AdamW, lr=1e-3, fused=True))
    with pytest.raises(ValueError, match="unscales in its step \\(fused\\): use fused=False"):
        _fit(module, max_steps=1, gradient_clip_val=1.0, plugins=[_fp16_mixed()])
