"""BiEncoder: pooling by hand, the training loss equals the loss function on the embeddings it documents
(hard negatives routed with their anchor's domain), precision, resume, and one-sentence errors."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_mtl.embeddings import BiEncoder, mnr_loss, mnr_plus_loss, pool_tokens
from tests.embeddings._models import tiny_config
from tests.embeddings._pairs import TokenPairs
from tests.fixtures.trainers import tiny_trainer

pytest.importorskip("transformers")


def _batch(n=6, k=0, **kwargs):
    return next(iter(DataLoader(TokenPairs(n=n, k=k, **kwargs), batch_size=n)))


def test_pooling_by_hand_with_left_and_right_padding():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])  # right-padded, left-padded
    torch.testing.assert_close(pool_tokens(hidden, mask, "last"), torch.stack([hidden[0, 2], hidden[1, 3]]))
    torch.testing.assert_close(pool_tokens(hidden, mask, "cls"), hidden[:, 0])
    torch.testing.assert_close(
        pool_tokens(hidden, mask, "mean"), torch.stack([hidden[0, :3].mean(0), hidden[1, 1:].mean(0)])
    )
    with pytest.raises(ValueError, match="pooling must be 'mean', 'cls' or 'last', got 'max'"):
        pool_tokens(hidden, mask, "max")


@pytest.mark.parametrize("layout", ["bert", "modernbert"])
@pytest.mark.parametrize("pooling", ["mean", "cls", "last"])
def test_embed_is_the_pooled_projected_normalised_hidden_state(layout, pooling):
    torch.manual_seed(0)
    module = BiEncoder(config=tiny_config(layout), pooling=pooling, normalize=True, projection_dim=5).eval()
    batch = _batch()
    features = batch["anchor"]
    hidden = module.encoder.model(**features).last_hidden_state
    mask = features["attention_mask"]
    lengths = mask.sum(1)
    rows = []
    for i in range(len(mask)):
        tokens = hidden[i, : lengths[i]]  # right padding
        rows.append({"mean": tokens.mean(0), "cls": tokens[0], "last": tokens[-1]}[pooling])
    expected = torch.nn.functional.normalize(module.projection(torch.stack(rows)), dim=-1)
    torch.testing.assert_close(module.embed(features), expected, rtol=1e-5, atol=1e-6)
    assert module.embed(features).shape == (6, 5)


@pytest.mark.parametrize("loss", ["mnr", "mnr_plus"])
def test_training_loss_is_the_loss_of_the_embeddings(loss):
    torch.manual_seed(0)
    k = 2 if loss == "mnr" else 0
    module = BiEncoder(config=tiny_config("bert"), loss=loss, loss_kwargs={"scale": 5.0}, num_experts=3).eval()
    batch = _batch(k=k)
    got = module.batch_loss(batch)
    domain = batch["domain"]
    a = module.embed(batch["anchor"], domain)
    p = module.embed(batch["positive"], domain)
    if k:
        # each negative, alone, through its anchor's expert
        negatives = torch.stack([
            torch.cat([module.embed({n: v[i, j : j + 1] for n, v in batch["negative"].items()}, domain[i : i + 1])
                       for j in range(k)])
            for i in range(6)
        ])  # fmt: skip
        expected = mnr_loss(a, p, negatives, scale=5.0)
    else:
        expected = mnr_plus_loss(a, p, scale=5.0)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_a_moe_bi_encoder_needs_domains_and_a_dense_one_ignores_them():
    module = BiEncoder(config=tiny_config("bert"), num_experts=2)
    batch = _batch(domains=2)
    with pytest.raises(ValueError, match="this BiEncoder has 2 experts: give a domain id per sample"):
        module.embed(batch["anchor"])
    dense = BiEncoder(config=tiny_config("bert"))
    torch.testing.assert_close(dense.embed(batch["anchor"], batch["domain"]), dense.embed(batch["anchor"]))


def test_bf16_mixed_loss_is_close_to_float32_and_float32_scored():
    torch.manual_seed(0)
    module = BiEncoder(config=tiny_config("bert")).eval()
    batch = _batch()
    full = module.batch_loss(batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = module.batch_loss(batch)
    assert low.dtype == torch.float32
    # bf16 keeps 8 bits of mantissa through two layers: cosine x 20 logits move by ~0.1
    assert low.item() == pytest.approx(full.item(), abs=0.25)


def test_16_mixed_on_a_cpu_trains_as_bf16_mixed(tmp_path):
    # Lightning runs `precision="16-mixed"` on a CPU as bf16-mixed (fp16 autocast has no CPU kernels): the
    # module needs nothing of its own, and its loss stays float32-scored under either
    optimizer = functools.partial(torch.optim.AdamW, lr=1e-2)
    torch.manual_seed(0)
    start = BiEncoder(config=tiny_config("bert"), num_experts=3, optimizer=optimizer)
    fitted = {}
    for precision in ("32", "bf16-mixed", "16-mixed"):
        module = copy.deepcopy(start)
        trainer = tiny_trainer(max_epochs=1, default_root_dir=tmp_path, limit_val_batches=0, precision=precision)
        trainer.fit(module, DataLoader(TokenPairs(n=16, k=1), batch_size=4, shuffle=False))
        assert trainer.global_step == 4 and torch.isfinite(trainer.callback_metrics["train/loss"])
        fitted[precision] = module
    pairs = list(zip(fitted["16-mixed"].parameters(), fitted["bf16-mixed"].parameters(), fitted["32"].parameters()))
    assert all(torch.equal(half, bf16) for half, bf16, _ in pairs)
    assert any(not torch.equal(half, full) for half, _, full in pairs)  # autocast did take effect


def _fit(module, tmp_path, epochs, ckpt=None, **kwargs):
    trainer = tiny_trainer(max_epochs=epochs, default_root_dir=tmp_path, enable_checkpointing=True,
                           limit_val_batches=0, **kwargs)  # fmt: skip
    trainer.fit(module, DataLoader(TokenPairs(n=16, k=1), batch_size=4, shuffle=False), ckpt_path=ckpt)
    return trainer


@pytest.mark.parametrize("precision", ["32", "bf16-mixed"])
def test_resume_is_bit_exact(tmp_path, precision):
    optimizer = functools.partial(torch.optim.AdamW, lr=1e-3)
    torch.manual_seed(0)
    start = BiEncoder(config=tiny_config("bert"), num_experts=3, optimizer=optimizer)
    straight = copy.deepcopy(start)
    _fit(straight, tmp_path / "a", 2, precision=precision)
    first = copy.deepcopy(start)
    trainer = _fit(first, tmp_path / "b", 1, precision=precision)
    ckpt = trainer.checkpoint_callback.best_model_path
    resumed = copy.deepcopy(start)
    _fit(resumed, tmp_path / "b", 2, ckpt=ckpt, precision=precision)
    changed = False
    for (name, a), b, s in zip(straight.named_parameters(), resumed.parameters(), start.parameters()):
        assert torch.equal(a, b), name
        changed |= not torch.equal(a, s)
    assert changed


def test_bad_model_input_gives_one_sentence(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="has no weights"):
        BiEncoder(path=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        BiEncoder(path=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="pooling must be 'mean', 'cls' or 'last', got 'max'"):
        BiEncoder(config=tiny_config("bert"), pooling="max")
    with pytest.raises(ValueError, match="unknown loss 'mnrr'"):
        BiEncoder(config=tiny_config("bert"), loss="mnrr")
