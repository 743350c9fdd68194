"""The continual-module base (seen-class mask, step, evaluation) and the ER / linear baselines."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from lightning_mtl.continual.base import mask_unseen
from lightning_mtl.continual.er import ER, LinearBaseline
from lightning_mtl.continual.stream import StreamBatch
from tests.fixtures.trainers import one_thread, tiny_trainer  # noqa: F401

TINY_VIT = dict(img_size=16, patch_size=4, embed_dim=48, depth=5, num_heads=3)


def tiny(cls=ER, **kwargs):
    torch.manual_seed(0)
    return cls(num_classes=6, backbone="vit_tiny_patch16_224", vit_kwargs=dict(TINY_VIT), **kwargs)


def batch(num_seen: int = 3, n: int = 8) -> StreamBatch:
    g = torch.Generator().manual_seed(1)
    return StreamBatch(
        x=torch.randn(n, 3, 16, 16, generator=g),
        y=torch.randint(0, num_seen, (n,), generator=g),
        num_seen=torch.full((n,), num_seen),
        is_new=torch.ones(n, dtype=torch.bool),
    )


def test_mask_unseen_per_row_and_scalar():
    logits = torch.arange(12.0).reshape(3, 4)
    masked = mask_unseen(logits, torch.tensor([1, 2, 4]))
    low = torch.finfo(logits.dtype).min
    assert torch.equal(masked[0], torch.tensor([0.0, low, low, low]))
    assert torch.equal(masked[1], torch.tensor([4.0, 5.0, low, low]))
    assert torch.equal(masked[2], logits[2])
    assert torch.equal(mask_unseen(logits, 2), mask_unseen(logits, torch.tensor(2)))
    # half precision keeps a finite minimum: a softmax over it puts no mass on the masked classes
    half = mask_unseen(logits.half(), 2)
    assert torch.isfinite(half).all() and half.float().softmax(1)[:, 2:].max() == 0


def test_default_loss_is_cross_entropy_over_the_seen_classes_only():
    module = tiny()
    b = batch(num_seen=3)
    loss, extras = module.training_loss(b)
    # the reference drops the unseen columns instead of masking them
    expected = F.cross_entropy(module(b.x)[:, :3], b.y)
    torch.testing.assert_close(loss, expected)
    assert extras["logits"].argmax(1).max() < 3


def _fit_one_step(module, b):
    class OneBatch(torch.utils.data.Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, i):
            return b

    trainer = tiny_trainer(max_steps=1, limit_val_batches=0)
    loader = torch.utils.data.DataLoader(OneBatch(), batch_size=None)
    trainer.fit(module, train_dataloaders=loader)
    return trainer


def test_er_step_equals_a_hand_written_adam_step():
    module = tiny()
    reference = copy.deepcopy(module)
    b = batch()
    _fit_one_step(module, b)
    # by hand: masked cross-entropy, backward, Adam(lr 5e-3) on every parameter
    optimizer = torch.optim.Adam(reference.parameters(), lr=5e-3)
    reference.train()
    F.cross_entropy(reference(b.x)[:, :3], b.y).backward()
    optimizer.step()
    for (name, got), want in zip(module.named_parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, msg=name)
    assert int(module.seen_classes) == 3 and "seen_classes" in module.state_dict()


def test_linear_baseline_trains_only_the_head_with_the_backbone_in_eval_mode():
    module = tiny(LinearBaseline)
    before = copy.deepcopy(module.state_dict())
    module.train()
    assert not module.backbone.training and module.head.training
    _fit_one_step(module, batch())
    after = module.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"head.weight", "head.bias", "seen_classes"}


def test_evaluation_masks_the_classes_not_seen_in_training():
    module = tiny(LinearBaseline)
    module.seen_classes.fill_(2)
    module.eval()
    x = torch.randn(5, 3, 16, 16)
    logged = {}
    module.log_dict = lambda values, **kw: logged.update(values)  # capture what the step logs
    module.validation_step((x, torch.zeros(5, dtype=torch.long)), 0)
    preds = module(x)[:, :2].argmax(1)
    assert logged["val/acc"] == pytest.approx((preds == 0).float().mean().item())


def test_non_finite_loss_names_the_step():
    module = tiny()
    b = batch()
    b = b._replace(x=b.x.clone().fill_(float("nan")))
    with pytest.raises(FloatingPointError, match="global step 0"):
        _fit_one_step(module, b)


def test_missing_checkpoint_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="Nothing is downloaded"):
        ER(
            num_classes=3,
            backbone="vit_tiny_patch16_224",
            checkpoint_path=str(tmp_path / "none.pth"),
            vit_kwargs=TINY_VIT,
        )


def test_accumulated_steps_equal_one_step_on_the_mean_gradient():
    # accumulate_grad_batches=2 over two stream steps: one SGD update with the mean of their gradients
    import functools

    module = tiny(optimizer=functools.partial(torch.optim.SGD, lr=0.1))
    reference = copy.deepcopy(module)
    first, second = batch(num_seen=3), batch(num_seen=4)._replace(x=torch.randn(8, 3, 16, 16))

    class TwoBatches(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return (first, second)[i]

    trainer = tiny_trainer(max_epochs=1, limit_val_batches=0, accumulate_grad_batches=2)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(TwoBatches(), batch_size=None))
    assert trainer.global_step == 1
    reference.train()
    loss = sum(F.cross_entropy(reference(b.x)[:, : int(b.num_seen[0])], b.y) for b in (first, second)) / 2
    loss.backward()
    with torch.no_grad():
        for p in reference.parameters():
            p -= 0.1 * p.grad
    for (name, got), want in zip(module.named_parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, msg=name)
    assert int(module.seen_classes) == 4


def test_a_head_narrower_than_the_stream_is_a_clear_error():
    from lightning_mtl.continual.stream import SiBlurryStream
    from lightning_mtl.datamodules.digits import Digits

    stream = SiBlurryStream(Digits(image_size=16, channels=3, as_dict=False), batch_size=16)
    module = tiny()  # 6 classes; the digits stream has 10
    with pytest.raises(ValueError, match="set model.init_args.num_classes to 10"):
        tiny_trainer(max_steps=1).fit(module, datamodule=stream)


@pytest.mark.parametrize("extra", [0, 3])
def test_a_step_schedule_horizon_other_than_the_estimated_optimizer_steps_is_named_in_a_warning(extra):
    import functools
    import warnings

    batches = [batch(num_seen=3)._replace(x=torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(i)))
               for i in range(4)]  # fmt: skip
    steps = 2 * len(batches) // 2  # two epochs of four batches, accumulated in pairs
    module = tiny(optimizer=functools.partial(torch.optim.SGD, lr=0.1),
                  lr_scheduler=functools.partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=0.1,
                                                 total_steps=steps + extra))  # fmt: skip
    trainer = tiny_trainer(max_epochs=2, limit_val_batches=0, accumulate_grad_batches=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    found = [str(w.message) for w in caught if "total_steps" in str(w.message)]
    if extra == 0:
        assert found == []
    else:
        assert len(found) == 1, found
        assert f"total_steps={steps + extra}" in found[0] and f"estimated_stepping_batches={steps}" in found[0]
        assert "model.init_args.lr_scheduler.init_args.total_steps" in found[0]
