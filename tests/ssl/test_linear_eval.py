"""LinearEvaluation: weights from an SSL checkpoint, a frozen backbone, only the head learns."""

from __future__ import annotations

import copy

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_mtl.architectures import DigitsCNN
from lightning_mtl.datamodules.digits import Digits
from lightning_mtl.ssl import BarlowTwins, LinearEvaluation, load_backbone_weights
from tests.fixtures.trainers import tiny_trainer


def _backbone(seed=0):
    torch.manual_seed(seed)
    return DigitsCNN(1, (4, 8), out_features=16)


def _ssl_checkpoint(tmp_path):
    """A real Lightning checkpoint of a BarlowTwins run (one short epoch)."""
    module = BarlowTwins(_backbone(seed=1), embedding_dim=8, projector_hidden=(8,), warmup_epochs=0)
    from lightning_mtl.ssl import SSLAugmentation, TwoViews

    aug = SSLAugmentation(
        crop_size=8, crop_scale=(0.6, 1.0), hflip_p=0.0, color_jitter=(0.0, 0.0, 0.0, 0.0), grayscale_p=0.0
    )
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = tiny_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0, enable_checkpointing=True,
                           callbacks=[checkpoint])  # fmt: skip
    trainer.fit(module, datamodule=Digits(as_dict=False, batch_size=32, train_transform=TwoViews(aug)))
    return tmp_path / "last.ckpt", module


def test_loads_the_backbone_of_an_ssl_checkpoint_and_only_the_head_learns(tmp_path):
    path, ssl_module = _ssl_checkpoint(tmp_path)
    module = LinearEvaluation(_backbone(seed=2), num_classes=10, checkpoint_path=str(path),
                              optimizer=lambda p: torch.optim.Adam(p, lr=0.01))  # fmt: skip
    for key, value in ssl_module.backbone.state_dict().items():
        assert torch.equal(module.backbone.state_dict()[key], value), key
    backbone_before = copy.deepcopy(module.backbone.state_dict())
    head_before = module.head.weight.detach().clone()
    trainer = tiny_trainer(max_epochs=2, limit_train_batches=4)
    trainer.fit(module, datamodule=Digits(as_dict=False, batch_size=32))
    for key, value in module.backbone.state_dict().items():  # weights and BatchNorm statistics unchanged
        assert torch.equal(value, backbone_before[key]), key
    assert not torch.equal(module.head.weight, head_before)
    assert all(not p.requires_grad for p in module.backbone.parameters())
    module.train()
    assert not module.backbone.training and module.head.training
    assert 0.0 <= float(trainer.callback_metrics["val/acc"]) <= 1.0
    assert "val/acc_top5" in trainer.callback_metrics
    trainer.test(module, datamodule=Digits(as_dict=False, batch_size=32), verbose=False)
    assert "test/acc" in trainer.callback_metrics


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_backbone_weights(_backbone(), str(tmp_path / "missing.ckpt"))
    torch.save({"state_dict": {"backbone.features.0.weight": torch.zeros(1)}}, tmp_path / "partial.ckpt")
    with pytest.raises(ValueError, match="missing"):
        load_backbone_weights(_backbone(), str(tmp_path / "partial.ckpt"))
    plain = _backbone(seed=3)
    torch.save(plain.state_dict(), tmp_path / "plain.pt")  # a bare state_dict, no prefix
    other = _backbone(seed=4)
    load_backbone_weights(other, str(tmp_path / "plain.pt"))
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), plain.state_dict().values()))


_UNPICKLED = []


def _record(value):
    _UNPICKLED.append(value)
    return value


class _Payload:
    """An arbitrary object: unpickling it calls a function of the pickler's choosing."""

    def __reduce__(self):
        return _record, ("code ran",)


def test_a_checkpoint_with_an_arbitrary_pickled_object_is_refused_unrun(tmp_path):
    plain = _backbone(seed=3)
    path = tmp_path / "payload.ckpt"
    torch.save({"state_dict": plain.state_dict(), "extra": _Payload()}, path)
    with pytest.raises(ValueError) as info:
        load_backbone_weights(_backbone(seed=4), str(path))
    assert _UNPICKLED == []  # refused before the object was built
    message = str(info.value)
    assert str(path) in message and "state_dict" in message and "weights_only=False" not in message, message


def test_without_checkpoint_warns():
    with pytest.warns(UserWarning, match="randomly initialized"):
        LinearEvaluation(_backbone(), num_classes=10)
