"""An online continual run resumed from a mid-stream checkpoint ends exactly where an uninterrupted run
ends: same parameters and buffers, same optimizer state, same anytime evaluations and continual summary.

(a) MVP, checkpoint between the two repetitions of a stream batch, before the first task end: the
    ``prompt_counts`` buffer (frequency-weighted selection), the ``logit_mask`` parameter, Adam's moments
    and ``seen_classes`` must all carry over.
(b) OnePrompt + VirtualOutlierRegularization, checkpoint after a task end whose head phase already ran; the
    resumed run goes through another task end (and its head phase) and must neither skip nor repeat one.

Each case trains once uninterrupted, saving checkpoints on the way, then resumes on fresh module, data and
callback objects from one of them under another global seed (nothing may depend on the process's RNG
state at the resume)."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_mtl.callbacks.anytime import AnytimeEvaluation
from lightning_mtl.continual import MVP, OnePrompt, SiBlurryStream, VirtualOutlierRegularization
from lightning_mtl.continual.transforms import ViTEvalTransform, ViTTrainTransform
from lightning_mtl.datamodules import Digits
from tests.fixtures.trainers import one_thread, tiny_trainer  # noqa: F401

TINY_VIT = dict(img_size=16, patch_size=4, embed_dim=48, depth=5, num_heads=3)
SUMMARY = ("continual/A_auc", "continual/A_avg", "continual/A_last", "continual/F_last")


def _stream(online_iter: float) -> SiBlurryStream:
    source = Digits(
        image_size=16,
        channels=3,
        as_dict=False,
        normalize=False,
        # the recipe's augmentation: random crops drawn on every fetch, so the resumed stream must draw
        # the same ones
        train_transform=ViTTrainTransform(image_size=16, padding=2, hflip=False),
        eval_transform=ViTEvalTransform(image_size=16),
    )
    return SiBlurryStream(source, num_tasks=10, batch_size=16, online_iter=online_iter, seed=0)


def _mvp() -> MVP:
    return MVP(10, backbone="vit_tiny_patch16_224", vit_kwargs=TINY_VIT, g_length=2, e_length=3, pool_size=4)


def _oneprompt() -> OnePrompt:
    return OnePrompt(10, backbone="vit_tiny_patch16_224", vit_kwargs=TINY_VIT, g_length=2, e_length=3)


def _vor() -> VirtualOutlierRegularization:
    return VirtualOutlierRegularization(epochs=2, batch_size=32, k=3, num_boundary=4, num_candidates=8,
                                        num_outliers=4, seed=7)  # fmt: skip


def _run(build, online_iter, max_steps, seed, tmp_path, every=None, ckpt_path=None, vor=False):
    pl.seed_everything(seed)
    module, stream = build(), _stream(online_iter)
    anytime = AnytimeEvaluation(eval_period=32, log_images=False, verbose=False)
    callbacks: list[pl.Callback] = [anytime]
    if vor:
        callbacks.append(_vor())
    if every:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=every, save_top_k=-1, filename="{step}"))
    trainer = tiny_trainer(max_steps=max_steps, callbacks=callbacks, enable_checkpointing=bool(every),
                           limit_val_batches=0, num_sanity_val_steps=0, use_distributed_sampler=False,
                           deterministic=True)  # fmt: skip
    trainer.fit(module, datamodule=stream, ckpt_path=ckpt_path)
    assert trainer.global_step == max_steps
    return module, trainer, callbacks


def _assert_same_run(full, resumed):
    (module_a, trainer_a, callbacks_a), (module_b, trainer_b, callbacks_b) = full, resumed
    state_a, state_b = module_a.state_dict(), module_b.state_dict()
    assert list(state_a) == list(state_b)
    for name, value in state_a.items():
        assert torch.equal(value, state_b[name]), f"{name} differs after resume"
    # Adam's moments and step counts
    opt_a, opt_b = trainer_a.optimizers[0].state_dict(), trainer_b.optimizers[0].state_dict()
    assert opt_a["state"].keys() == opt_b["state"].keys() and opt_a["state"]
    for index, slots in opt_a["state"].items():
        for slot, value in slots.items():
            assert torch.equal(value, opt_b["state"][index][slot]), f"Adam {slot} of parameter {index} differs"
    # every anytime evaluation, and the summary
    anytime_a, anytime_b = callbacks_a[0], callbacks_b[0]
    assert len(anytime_a.evaluations) >= 3
    # repr: exact for floats, and NaN (a class not seen yet) equals NaN
    assert repr(anytime_b.evaluations) == repr(anytime_a.evaluations)
    assert repr(anytime_b.class_accuracies) == repr(anytime_a.class_accuracies) and anytime_a.class_accuracies
    for key in SUMMARY:
        a, b = float(trainer_a.callback_metrics[key]), float(trainer_b.callback_metrics[key])
        assert (math.isnan(a) and math.isnan(b)) or a == b, f"{key}: {a} vs {b}"
    assert math.isfinite(float(trainer_b.callback_metrics["continual/A_auc"]))


def test_mvp_resumes_mid_stream_batch(tmp_path):
    # online_iter 2: step 11 is the first repetition of stream batch 5; the first task ends at batch 15
    full = _run(_mvp, online_iter=2.0, max_steps=22, seed=0, tmp_path=tmp_path, every=11)
    stream = _stream(2.0)
    assert stream.schedule[11].stream_batch == stream.schedule[10].stream_batch
    assert [i for i, s in enumerate(stream.schedule[:22]) if s.task_end] == [15]
    checkpoint = torch.load(tmp_path / "step=11.ckpt", weights_only=False)
    assert checkpoint["SiBlurryStream"]["consumed_batches"] == 11
    counts = checkpoint["state_dict"]["prompt_counts"]
    assert 0 < int(counts.sum()) < int(full[0].prompt_counts.sum())  # the buffer moved after the checkpoint
    assert not torch.equal(checkpoint["state_dict"]["logit_mask"], full[0].logit_mask.detach())

    resumed = _run(_mvp, online_iter=2.0, max_steps=22, seed=123, tmp_path=tmp_path / "resumed",
                   ckpt_path=tmp_path / "step=11.ckpt")  # fmt: skip
    _assert_same_run(full, resumed)
    assert int(resumed[0].seen_classes) == stream.schedule[21].num_seen


def test_oneprompt_with_vor_resumes_after_a_task_end(tmp_path):
    # online_iter 1: tasks end at batches 7 and 16; the checkpoint at step 10 holds the head phase of task 0
    full = _run(_oneprompt, online_iter=1.0, max_steps=20, seed=0, tmp_path=tmp_path, every=10, vor=True)
    stream = _stream(1.0)
    assert [i for i, s in enumerate(stream.schedule[:20]) if s.task_end] == [7, 16]
    vor_state = next(v for k, v in torch.load(tmp_path / "step=10.ckpt", weights_only=False)["callbacks"].items()
                     if k.startswith("VirtualOutlierRegularization"))  # fmt: skip
    assert vor_state["done_tasks"] == [0]
    assert full[2][1].done_tasks == {0, 1}

    resumed = _run(_oneprompt, online_iter=1.0, max_steps=20, seed=123, tmp_path=tmp_path / "resumed",
                   ckpt_path=tmp_path / "step=10.ckpt", vor=True)  # fmt: skip
    _assert_same_run(full, resumed)
    vor_a, vor_b = full[2][1], resumed[2][1]
    assert vor_b.done_tasks == {0, 1}
    assert vor_b.history == vor_a.history and set(vor_b.history) == {0, 1}
