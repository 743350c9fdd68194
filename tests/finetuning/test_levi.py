"""LEVI: the loss against a hand computation, the frozen backbone untouched, the feature cache (same step,
invalidation, augmented inputs), resume, bf16-mixed, timm and Hugging Face backbones, clear errors."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

from lightning_mtl.architectures import DigitsCNN
from lightning_mtl.datamodules import Digits
from lightning_mtl.finetuning import LEVI, LEVIFeatureCache
from lightning_mtl.finetuning.levi import backbone_fingerprint
from tests.fixtures.trainers import tiny_trainer

LAYERS = ["features.4", "project"]  # features.4 is a BatchNorm followed by an in-place ReLU


def _cnn(seed: int = 0) -> DigitsCNN:
    torch.manual_seed(seed)
    backbone = DigitsCNN(channels=(4, 8), out_features=16)
    with torch.no_grad():  # non-trivial running statistics, so eval mode matters
        for m in backbone.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return backbone


def _levi(seed: int = 0, **kwargs) -> LEVI:
    backbone = kwargs.pop("backbone", None) or _cnn(seed)
    torch.manual_seed(seed + 1)
    defaults = dict(layers=LAYERS, input_shape=[1, 8, 8], small_width=4, adapter_hidden=8,
                    optimizer=functools.partial(torch.optim.SGD, lr=0.1))  # fmt: skip
    defaults.update(kwargs)
    return LEVI(10, backbone=backbone, **defaults)


def _data(**kwargs) -> Digits:
    return Digits(batch_size=kwargs.pop("batch_size", 32), seed=0, **kwargs)


def _trained(module: LEVI) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if not k.startswith("backbone.")}


def _layer_norm(v: torch.Tensor) -> torch.Tensor:
    mean = v.mean(dim=1, keepdim=True)
    var = ((v - mean) ** 2).mean(dim=1, keepdim=True)
    return (v - mean) / torch.sqrt(var + 1e-5)


def test_the_loss_equals_a_hand_computation():
    """Views read before the in-place ReLU, pooled, standardised, concatenated in order (backbone layers, then
    the small model), a two-layer MLP and the cross-entropy, all written out by hand."""
    module = _levi().eval()
    x, y = torch.randn(6, 1, 8, 8), torch.tensor([0, 3, 9, 3, 1, 7])
    cnn = module.backbone
    with torch.no_grad():
        bn = cnn.features[:5](x)  # the BatchNorm's output, before the ReLU that follows it in place
        view_a = bn.mean(dim=(2, 3))
        view_b = cnn(x)
        small = module.small_model(x)
        z = torch.cat([_layer_norm(view_a), _layer_norm(view_b), _layer_norm(small)], dim=1)
        first, last = module.adapter[0], module.adapter[2]
        logits = torch.relu(z @ first.weight.T + first.bias) @ last.weight.T + last.bias
        expected = (torch.logsumexp(logits, dim=1) - logits[torch.arange(6), y]).mean()
        loss, got_logits, _ = module._loss((x, {"digit": y}))
    assert (view_a < 0).any(), "the BatchNorm view must keep negative values (read before the ReLU)"
    assert module.view_dims == [4, 16, 4 * 2 * 4]
    torch.testing.assert_close(got_logits, logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_linear_adapting_layer_without_small_model_is_a_linear_probe():
    module = _levi(layers=["project"], use_small_model=False, adapter_hidden=0, normalize_views=False).eval()
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        expected = module.backbone(x) @ module.adapter.weight.T + module.adapter.bias
        torch.testing.assert_close(module(x), expected)
    assert module.small_model is None


def test_the_backbone_gets_no_gradient_and_stays_bit_identical():
    module = _levi()
    before = copy.deepcopy(module.backbone.state_dict())
    trained = _trained(module)
    tiny_trainer(max_steps=3, limit_val_batches=0).fit(module, datamodule=_data())
    after = module.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the frozen backbone changed (weights or BN stats)"
    assert all(p.grad is None and not p.requires_grad for p in module.backbone.parameters())
    assert not module.backbone.training
    changed = [k for k, v in _trained(module).items() if not torch.equal(v, trained[k])]
    assert any(k.startswith("adapter.") for k in changed) and any(k.startswith("small_model.") for k in changed)


def test_full_fine_tuning_trains_the_backbone():
    module = _levi(freeze_backbone=False, use_small_model=False, layers=["project"])
    before = copy.deepcopy(module.backbone.state_dict())
    tiny_trainer(max_steps=2, limit_val_batches=0).fit(module, datamodule=_data())
    assert not torch.equal(before["project.1.weight"], module.backbone.state_dict()["project.1.weight"])


def test_cached_and_uncached_training_give_the_same_steps():
    """First epoch: the cache computes every batch, so the steps are identical bit for bit. Second epoch
    (reshuffled): every feature comes from the cache, equal to a fresh forward up to the float32 rounding of
    convolutions over other batch compositions."""
    results, caches = {}, {}
    for epochs in (1, 2):
        for cached in (False, True):
            module = _levi()
            caches[epochs, cached] = cache = LEVIFeatureCache()
            tiny_trainer(max_epochs=epochs, limit_val_batches=0, callbacks=[cache] if cached else []).fit(
                module, datamodule=_small_data()
            )
            results[epochs, cached] = _trained(module)
    for k, v in results[1, False].items():
        assert torch.equal(v, results[1, True][k]), k
    for k, v in results[2, False].items():
        torch.testing.assert_close(results[2, True][k], v, rtol=1e-5, atol=1e-6)
    n = len(_small_train())
    store = caches[2, True].store
    assert store.misses == n and store.hits == n  # the second epoch computed nothing
    assert not torch.equal(results[1, False]["adapter.0.weight"], results[2, False]["adapter.0.weight"])


def _small_data() -> Digits:
    return _data(split_fractions=(0.1, 0.45, 0.45))


def _small_train():
    data = _small_data()
    data.setup("fit")
    return data.train_set


def test_the_cache_is_keyed_by_backbone_and_data(tmp_path):
    module = _levi()
    cache = LEVIFeatureCache(directory=str(tmp_path))
    tiny_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0, callbacks=[cache]).fit(
        module, datamodule=_data()
    )
    files = list(tmp_path.glob("levi_features_*.pt"))
    assert len(files) == 1
    # the same backbone in a new run reads the file: no training sample is computed again
    again = LEVIFeatureCache(directory=str(tmp_path))
    tiny_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0, callbacks=[again]).fit(
        _levi(), datamodule=_data()
    )
    assert again.store.misses == 0 and again.store.hits == 64
    # another backbone: another fingerprint, an empty store
    other = _levi(seed=5)
    assert backbone_fingerprint(other, "32-true") != backbone_fingerprint(module, "32-true")
    assert backbone_fingerprint(module, "bf16-mixed") != backbone_fingerprint(module, "32-true")
    fresh = LEVIFeatureCache(directory=str(tmp_path))
    tiny_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0, callbacks=[fresh]).fit(
        other, datamodule=_data()
    )
    assert fresh.store.hits == 0 and fresh.store.misses == 64
    # changed data: a sample differing in one value misses
    store = LEVIFeatureCache().store
    sample = _small_train().inputs[:2].clone()
    store.lookup(sample, module.backbone_features)
    store.lookup(sample, module.backbone_features)
    assert (store.misses, store.hits) == (2, 2)
    sample[1, 0, 3, 3] += 1e-3
    store.lookup(sample, module.backbone_features)
    assert (store.misses, store.hits) == (3, 3)


def test_augmented_inputs_switch_the_cache_off():
    cache = LEVIFeatureCache()
    module = _levi()
    data = _data(train_transform=lambda img: img + 0.05 * torch.randn_like(img))
    with pytest.warns(UserWarning, match="switched off"):
        tiny_trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=0, callbacks=[cache]).fit(
            module, datamodule=data
        )
    assert not cache.enabled and module.feature_cache is None


def test_the_cache_refuses_a_trained_backbone():
    module = _levi(freeze_backbone=False)
    with pytest.raises(ValueError, match="freeze_backbone"):
        tiny_trainer(max_steps=1, callbacks=[LEVIFeatureCache()]).fit(module, datamodule=_data())


def test_resume_is_bit_exact(tmp_path):
    def trainer(epochs):
        return tiny_trainer(max_epochs=epochs, limit_train_batches=3, limit_val_batches=0,
                            callbacks=[LEVIFeatureCache()])  # fmt: skip

    straight = _levi(optimizer=functools.partial(torch.optim.AdamW, lr=1e-2))
    trainer(2).fit(straight, datamodule=_data())
    first = _levi(optimizer=functools.partial(torch.optim.AdamW, lr=1e-2))
    t = trainer(1)
    t.fit(first, datamodule=_data())
    t.save_checkpoint(tmp_path / "half.ckpt")
    resumed = _levi(seed=3, optimizer=functools.partial(torch.optim.AdamW, lr=1e-2))  # other weights: all from the file
    trainer(2).fit(resumed, datamodule=_data(), ckpt_path=tmp_path / "half.ckpt")
    for k, v in straight.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_bf16_mixed_on_cpu():
    """Under bf16 autocast: logits within bf16 rounding of float32, the backbone untouched, the heads trained,
    and the cache still gives the uncached step."""
    module = _levi()
    x = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        reference = module.eval()(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = module(x)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), reference, rtol=0.05, atol=0.05)
    before = copy.deepcopy(module.backbone.state_dict())
    runs = {}
    for cached in (False, True):
        levi = _levi()
        callbacks = [LEVIFeatureCache()] if cached else []
        tiny_trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=0, precision="bf16-mixed",
                     callbacks=callbacks).fit(levi, datamodule=_data())  # fmt: skip
        runs[cached] = _trained(levi)
        assert all(torch.equal(before[k], v) for k, v in levi.backbone.state_dict().items())
    for k, v in runs[False].items():
        assert torch.equal(v, runs[True][k]), k
    assert not torch.equal(runs[False]["adapter.0.weight"], _trained(_levi())["adapter.0.weight"])


def test_a_timm_backbone_gives_its_forward_intermediates():
    module = LEVI(10, timm_name="resnet18", timm_kwargs={"in_chans": 1}, layers=[1, 3], input_shape=[1, 16, 16]).eval()
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        maps = module.backbone.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
        expected = torch.cat([m.mean(dim=(2, 3)) for m in maps], dim=1)
        torch.testing.assert_close(module.backbone_features(x), expected)
    assert module.view_dims[:2] == [64, 256]


def test_a_hugging_face_backbone_pools_its_hidden_states_over_real_tokens():
    config = dict(model_type="bert", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64, vocab_size=50, max_position_embeddings=16)  # fmt: skip
    module = LEVI(3, hf_config=config, layers=[0, 2]).eval()
    ids = torch.randint(1, 50, (2, 5))
    short = {"input_ids": ids, "attention_mask": torch.ones(2, 5, dtype=torch.long)}
    padded = {"input_ids": torch.cat([ids, torch.zeros(2, 3, dtype=torch.long)], dim=1),
              "attention_mask": torch.cat([torch.ones(2, 5), torch.zeros(2, 3)], dim=1).long()}  # fmt: skip
    with torch.no_grad():
        hidden = module.backbone(**short, output_hidden_states=True).hidden_states
        expected = torch.cat([hidden[0].mean(dim=1), hidden[2].mean(dim=1)], dim=1)
        torch.testing.assert_close(module.backbone_features(short), expected)
        torch.testing.assert_close(module.backbone_features(padded), expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(module(padded), module(short), rtol=1e-4, atol=1e-5)
        loss, _, _ = module._loss({**short, "labels": torch.tensor([0, 2])})
    assert loss.ndim == 0


def test_bad_arguments_get_one_sentence():
    with pytest.raises(ValueError, match="not submodule names"):
        _levi(layers=["features.99"])
    with pytest.raises(ValueError, match="exactly one of"):
        LEVI(10, backbone=_cnn(), timm_name="resnet18", input_shape=[1, 8, 8])
    with pytest.raises(ValueError, match="input_shape"):
        LEVI(10, backbone=_cnn(), layers=["project"])
    with pytest.raises(FileNotFoundError, match="backbone_weights"):
        LEVI(10, backbone=_cnn(), layers=["project"], input_shape=[1, 8, 8], backbone_weights="missing.pt")
    with pytest.raises(ValueError, match="integer layer indices"):
        LEVI(10, timm_name="resnet18", layers=["layer1"], input_shape=[3, 16, 16])
