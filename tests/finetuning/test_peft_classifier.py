"""PEFTClassifier: only the adapter and the head move, checkpoints hold only them and load onto the base,
CE + weight x SupCon and embedding mixup equal hand computations, resume is bit-exact, bf16-mixed works."""

from __future__ import annotations

import functools
import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from lightning_mtl.architectures import TransformersEncoder
from lightning_mtl.finetuning import EDA, FewShotText, PEFTClassifier, list_adapters
from tests.fixtures.trainers import tiny_trainer

BERT = dict(model_type="bert", vocab_size=2048, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=64)  # fmt: skip
ADAPTERS = {"lora": {"r": 4}, "prefix": {"num_virtual_tokens": 4}}


def _module(adapter="lora", **kwargs):
    kwargs.setdefault("optimizer", functools.partial(torch.optim.SGD, lr=0.5))
    return PEFTClassifier(num_classes=4, adapter=adapter, adapter_kwargs=ADAPTERS[adapter], config=BERT, **kwargs)


def _data(**kwargs):
    kwargs.setdefault("per_class", 4)
    return FewShotText(val_per_class=2, test_per_class=4, max_length=24, batch_size=8, **kwargs)


def _augmented(**kwargs):
    return _data(augment=EDA(alpha=0.2, synonyms={"return": ["give"]}), num_views=1, **kwargs)


def test_every_adapter_is_tested():
    assert set(list_adapters()) == set(ADAPTERS)


@pytest.mark.parametrize("adapter", sorted(ADAPTERS))
def test_a_step_changes_only_the_adapter_and_the_head_bit_for_bit(adapter):
    module = _module(adapter, supcon_weight=0.5)
    before = {k: v.detach().clone() for k, v in module.state_dict().items()}
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable == module.saved_keys and any(n.startswith("head.") for n in trainable)
    assert all(
        n.startswith("head.") or ("lora_" in n if adapter == "lora" else "prompt_encoder" in n) for n in trainable
    )
    tiny_trainer(max_steps=1, limit_val_batches=0).fit(module, datamodule=_augmented())
    after = module.state_dict()
    for key, value in before.items():
        if key in trainable:
            continue
        assert torch.equal(value, after[key]), f"{key} is frozen but changed"
    moved = {k for k in trainable if not torch.equal(before[k], after[k])}
    assert {"head.weight", "head.bias"} <= moved
    assert moved - {"head.weight", "head.bias"}, "no adapter parameter moved"


def test_lora_starts_as_the_base_model_and_prefix_tuning_changes_the_output():
    ids = torch.randint(2, 2048, (3, 12))
    torch.manual_seed(0)  # the base weights PEFTClassifier(model_seed=0) builds before it wraps them
    plain = TransformersEncoder(config=BERT).eval()(ids)
    for adapter in ADAPTERS:
        tuned = _module(adapter).eval().embed(ids)
        if adapter == "lora":  # B = 0 at the start: exactly the base model's output
            assert torch.equal(tuned, plain)
        else:  # the prefixes take part in every layer's attention
            assert not torch.allclose(tuned, plain, atol=1e-4)


def _hand_supcon(z, y, tau):
    z = F.normalize(z, dim=1)
    total, anchors = 0.0, 0
    for i in range(len(z)):
        positives = [p for p in range(len(z)) if p != i and y[p] == y[i]]
        if not positives:
            continue
        denominator = sum(math.exp(float(z[i] @ z[a]) / tau) for a in range(len(z)) if a != i)
        total += -sum(float(z[i] @ z[p]) / tau - math.log(denominator) for p in positives) / len(positives)
        anchors += 1
    return total / anchors


def test_ce_plus_weighted_supcon_equals_a_hand_computation():
    module = _module(supcon_weight=0.3, supcon_temperature=0.5)
    z = torch.randn(6, 32, dtype=torch.float64).float()
    y = torch.tensor([0, 1, 0, 2, 1, 3])  # class 3 has no positive: left out of SupCon's mean
    out = module.losses(z, y)
    logits = module.head(z)
    ce = sum(-float(torch.log_softmax(logits[i], 0)[y[i]]) for i in range(6)) / 6
    supcon = _hand_supcon(z.double(), y.tolist(), 0.5)
    assert out["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert out["supcon"].item() == pytest.approx(supcon, rel=1e-5)
    assert out["loss"].item() == pytest.approx(ce + 0.3 * supcon, rel=1e-5)
    assert "supcon" not in _module().losses(z, y)  # weight 0: cross-entropy alone


def test_embedding_mixup_equals_the_hand_mix():
    module = _module(mixup_alpha=0.4)
    z, y = torch.randn(5, 32), torch.tensor([0, 1, 2, 3, 1])
    torch.manual_seed(3)
    loss = module.losses(z, y)["ce"]
    torch.manual_seed(3)  # the draws Mixup makes: lam ~ Beta(0.4, 0.4), then a permutation
    lam = float(torch.distributions.Beta(0.4, 0.4).sample((1,)))
    perm = torch.randperm(5)
    mixed = lam * z + (1 - lam) * z[perm]
    target = lam * F.one_hot(y, 4).float() + (1 - lam) * F.one_hot(y[perm], 4).float()
    expected = -(target * torch.log_softmax(module.head(mixed), 1)).sum(1).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert 0 < lam < 1 and not torch.equal(perm, torch.arange(5))  # the case tests a real mix


@pytest.mark.parametrize("adapter", sorted(ADAPTERS))
def test_the_checkpoint_holds_only_adapter_and_head_and_loads_onto_the_base(tmp_path, adapter):
    pl.seed_everything(0)
    module = _module(adapter, supcon_weight=0.5)
    trainer = tiny_trainer(max_steps=2, limit_val_batches=0, enable_checkpointing=True, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=_augmented())
    path = tmp_path / "tuned.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)["state_dict"]
    assert set(saved) == module.saved_keys
    assert sum(v.numel() for v in saved.values()) < 0.2 * sum(p.numel() for p in module.parameters())
    loaded = PEFTClassifier.load_from_checkpoint(path, optimizer=None).eval()
    ids = torch.randint(2, 2048, (4, 16))
    assert torch.equal(loaded(ids), module.eval()(ids))


def _fit(tmp_path, max_epochs, ckpt_path=None, **kwargs):
    pl.seed_everything(0)
    module = _module("lora", supcon_weight=0.5, mixup_alpha=0.4,
                     optimizer=functools.partial(torch.optim.AdamW, lr=1e-2))  # fmt: skip
    trainer = tiny_trainer(max_epochs=max_epochs, limit_val_batches=0, default_root_dir=tmp_path, **kwargs)
    trainer.fit(module, datamodule=_augmented(), ckpt_path=ckpt_path)
    return module, trainer


def test_resume_is_bit_exact(tmp_path):
    """Two epochs of 2 steps straight, or one epoch, a checkpoint and a fresh process state: the EDA copies
    (per epoch), the mixup draws, AdamW's moments and the adapter all agree."""
    straight, _ = _fit(tmp_path / "a", 2)
    first, trainer = _fit(tmp_path / "b", 1)
    trainer.save_checkpoint(tmp_path / "epoch1.ckpt")
    torch.manual_seed(123)  # the resumed run must not depend on the global generator's state here
    resumed, _ = _fit(tmp_path / "c", 2, ckpt_path=tmp_path / "epoch1.ckpt")
    for key in straight.saved_keys:
        assert torch.equal(straight.state_dict()[key], resumed.state_dict()[key]), key
    assert any(not torch.equal(first.state_dict()[k], straight.state_dict()[k]) for k in straight.saved_keys)


def test_bf16_mixed_trains_and_keeps_the_base_frozen():
    steps = {}
    for precision in ("32-true", "bf16-mixed"):
        pl.seed_everything(0)
        module = _module("lora", supcon_weight=0.5)
        before = module.state_dict()["encoder.model.base_model.model.embeddings.word_embeddings.weight"].clone()
        tiny_trainer(max_steps=1, limit_val_batches=0, precision=precision).fit(module, datamodule=_augmented())
        assert torch.equal(
            before, module.state_dict()["encoder.model.base_model.model.embeddings.word_embeddings.weight"]
        )
        steps[precision] = module.head.weight.detach().clone()
    start = _module("lora").head.weight.detach()
    update = steps["32-true"] - start
    # bf16 keeps 8 bits of mantissa in the forward pass: the step agrees to a few percent of its size
    assert (steps["bf16-mixed"] - steps["32-true"]).norm() < 0.05 * update.norm()


def test_bad_arguments_get_one_sentence():
    with pytest.raises(ValueError, match="unknown adapter 'lorra'; did you mean lora"):
        PEFTClassifier(num_classes=2, adapter="lorra", config=BERT)
    with pytest.raises(ValueError, match="num_classes"):
        PEFTClassifier(num_classes=1, config=BERT)
