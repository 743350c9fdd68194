"""The LoFiT module: what each stage trains (and nothing else), the planted head, the saved files, the DPO
reference, resume and bf16-mixed on CPU."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
from torch.utils.data import DataLoader, default_collate

from lightning_mtl.finetuning import LoFiT, PreferencePairs, answer_token_accuracy, build_causal_lm, load_intervention
from tests.finetuning._models import CONFIGS, GPT2, VOCAB
from tests.fixtures.trainers import one_thread, tiny_trainer  # noqa: F401

HEADS = [[1, 2], [0, 1]]


def _data(**kwargs):
    defaults = dict(num_train=32, num_val=16, vocab_size=VOCAB, prompt_length=6, answer_length=3, batch_size=8)
    return PreferencePairs(**{**defaults, **kwargs})


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("loss", ["sft", "dpo"])
@pytest.mark.parametrize("stage", ["localize", "tune"])
def test_a_step_changes_only_the_parameter_of_the_stage_on_its_heads(stage, loss):
    torch.manual_seed(0)
    module = LoFiT(config=CONFIGS["llama"], stage=stage, loss=loss, heads=HEADS if stage == "tune" else None)
    before = _snapshot(module)
    tiny_trainer(max_steps=2, limit_val_batches=0).fit(module, datamodule=_data())
    after = _snapshot(module)
    trained = "intervention.scale" if stage == "localize" else "intervention.offset"
    for key, value in before.items():
        if key != trained:
            assert torch.equal(value, after[key]), f"{key} changed"
    moved = after[trained] != before[trained]
    if stage == "localize":
        assert moved.all()  # every head is a candidate
    else:
        expected = torch.zeros_like(moved)
        for layer, head in HEADS:
            expected[layer, head] = True
        assert torch.equal(moved, expected)


def test_the_training_loss_is_token_cross_entropy_plus_l1_of_the_scales():
    torch.manual_seed(0)
    module = LoFiT(config=CONFIGS["gpt2"], stage="localize", l1_lambda=0.25)
    data = _data()
    data.setup()
    batch = next(iter(data.train_dataloader()))
    module.log = lambda *args, **kwargs: None
    loss = module.training_step(batch, 0)
    logits = module(batch["chosen_input_ids"], batch["chosen_attention_mask"])
    # cross-entropy by hand: the answer tokens (3 per pair) predicted from the position before each
    log_probs = torch.log_softmax(logits, -1)
    picked = [-log_probs[i, t - 1, batch["chosen_labels"][i, t]] for i in range(8) for t in range(6, 9)]
    expected = torch.stack(picked).mean() + 0.25 * module.intervention.scale.abs().sum()
    torch.testing.assert_close(loss, expected)


def test_dpo_starts_at_log_2_against_the_base_model_as_reference():
    """With v = 0 the policy is the base model, the reference: every margin is 0 and the loss log 2."""
    module = LoFiT(config=CONFIGS["qwen2"], stage="tune", loss="dpo", heads=HEADS, init_std=0.0)
    data = _data()
    data.setup()
    batch = next(iter(data.train_dataloader()))
    module.log = lambda *args, **kwargs: None
    assert module.training_step(batch, 0).item() == pytest.approx(math.log(2), abs=1e-6)
    with torch.no_grad():
        module.intervention.offset[1, 2] = 0.5
    assert module.training_step(batch, 0).item() != pytest.approx(math.log(2), abs=1e-4)


def test_stage_files_chain_localize_to_tune_to_inference(tmp_path):
    torch.manual_seed(0)
    localize = LoFiT(config=GPT2, stage="localize", top_k=3, save_path=str(tmp_path / "heads.pt"))
    tiny_trainer(max_steps=3, limit_val_batches=0).fit(localize, datamodule=_data())
    ranking = localize.intervention.rank_heads()
    assert localize.top_heads() == ranking[:3]

    tune = LoFiT(config=GPT2, stage="tune", heads=str(tmp_path / "heads.pt"), top_k=2, save_path=str(tmp_path / "v.pt"))
    assert tune.intervention.selected_heads() == sorted(ranking[:2])
    assert torch.count_nonzero(tune.intervention.scale) == 0  # A is not used when tuning, as the official code
    tiny_trainer(max_steps=3, limit_val_batches=0).fit(tune, datamodule=_data())

    base = build_causal_lm(config=GPT2)
    load_intervention(base, tmp_path / "v.pt")
    ids = torch.randint(1, VOCAB, (2, 9))
    with torch.no_grad():
        assert torch.equal(base(input_ids=ids).logits, tune(ids))


def test_resume_from_a_checkpoint_reproduces_the_uninterrupted_run_bit_for_bit(tmp_path):
    def run(epochs, ckpt=None):
        torch.manual_seed(0)
        module = LoFiT(config=GPT2, stage="localize")
        trainer = tiny_trainer(max_epochs=epochs, limit_val_batches=0)
        trainer.fit(module, datamodule=_data(), ckpt_path=ckpt)
        return module, trainer

    whole, _ = run(2)
    _, first = run(1)
    first.save_checkpoint(tmp_path / "epoch1.ckpt")
    checkpoint = torch.load(tmp_path / "epoch1.ckpt", weights_only=False)
    assert sorted(checkpoint["state_dict"]) == ["intervention.head_mask", "intervention.offset", "intervention.scale"]
    resumed, trainer = run(2, tmp_path / "epoch1.ckpt")
    assert trainer.global_step == 8
    assert torch.equal(resumed.intervention.scale, whole.intervention.scale)
    torch.manual_seed(0)
    assert not torch.equal(whole.intervention.scale, LoFiT(config=GPT2).intervention.scale)  # it trained


def test_bf16_mixed_trains_on_cpu_with_float32_parameters():
    """(Lightning turns 16-mixed on the CPU into bf16-mixed; 16-mixed with its gradient scaler needs a GPU.)"""
    torch.manual_seed(0)
    module = LoFiT(config=CONFIGS["llama"], stage="tune", heads=HEADS)
    before = _snapshot(module)
    tiny_trainer(max_steps=2, limit_val_batches=0, precision="bf16-mixed").fit(module, datamodule=_data())
    assert module.intervention.offset.dtype == torch.float32
    assert not torch.equal(module.intervention.offset[1, 2], before["intervention.offset"][1, 2])
    for key, value in module.model.state_dict().items():
        assert torch.equal(value, before[f"model.{key}"]), key


def test_bad_arguments_are_one_sentence_each():
    with pytest.raises(ValueError, match="stage 'tune' needs `heads`"):
        LoFiT(config=GPT2, stage="tune")
    with pytest.raises(ValueError, match="stage must be 'localize' or 'tune'"):
        LoFiT(config=GPT2, stage="select")
    with pytest.raises(ValueError, match="loss must be 'sft' or 'dpo'"):
        LoFiT(config=GPT2, loss="ppo")
    with pytest.raises(ValueError, match=r"head \(2, 0\) is outside a model of 2 layers x 4 heads"):
        LoFiT(config=GPT2, stage="tune", heads=[[2, 0]])
    with pytest.raises(ValueError, match="exactly one of `path`"):
        LoFiT()
    with pytest.raises(FileNotFoundError, match="no model folder at"):
        LoFiT(path="no/such/folder")


# -- the planted head ----------------------------------------------------------------------------------
E, D = 32, 8
PLANTED = (1, 2)


def _teacher_task(teacher, n, generator, length=12, answer=4):
    """Random prompts; the answer tokens are the teacher's greedy predictions (SFT labels)."""
    ids = torch.randint(1, VOCAB, (n, length), generator=generator)
    with torch.no_grad():
        predicted = teacher(input_ids=ids).logits.argmax(-1)
    labels = torch.full_like(ids, -100)
    labels[:, length - answer :] = predicted[:, length - answer - 1 : length - 1]
    return [{"chosen_input_ids": i, "chosen_labels": y, "chosen_attention_mask": torch.ones_like(i)}
            for i, y in zip(ids, labels)]  # fmt: skip


def _accuracy(module, data):
    batch = default_collate(data)
    with torch.no_grad():
        logits = module(batch["chosen_input_ids"], batch["chosen_attention_mask"])
    return answer_token_accuracy(logits, batch["chosen_labels"]).item()


def _fit(module, data, epochs):
    torch.manual_seed(0)
    tiny_trainer(max_epochs=epochs, limit_val_batches=0).fit(module, DataLoader(data, batch_size=32, shuffle=True))
    return module


def test_a_planted_head_is_ranked_first_and_tuning_it_alone_recovers_the_task():
    """The student is the teacher with one head's value bias shifted by b: since attention weights sum to
    one, that head's output is z + b, which v = -b on that head undoes exactly (accuracy 1). Stage 1 must rank
    that head first; stage 2 with K = 1 must recover most of the accuracy the corruption lost, and the same
    budget on another head must not."""
    teacher = build_causal_lm(config={**GPT2, "initializer_range": 0.2})
    student = copy.deepcopy(teacher)
    b = torch.randn(D, generator=torch.Generator().manual_seed(1))
    b = b / b.norm() * 2.0 * D**0.5
    value = slice(2 * E + PLANTED[1] * D, 2 * E + (PLANTED[1] + 1) * D)  # c_attn's columns: q, k, v
    with torch.no_grad():
        student.transformer.h[PLANTED[0]].attn.c_attn.bias[value] += b
    generator = torch.Generator().manual_seed(0)
    train, val = _teacher_task(teacher, 512, generator), _teacher_task(teacher, 128, generator)

    adam = functools.partial(torch.optim.AdamW, weight_decay=0.0)
    torch.manual_seed(0)
    localize = LoFiT(
        model=copy.deepcopy(student), stage="localize", l1_lambda=3e-2, optimizer=functools.partial(adam, lr=2e-2)
    )
    corrupted = _accuracy(localize, val)
    _fit(localize, train, epochs=2)
    norms = localize.intervention.head_norms()
    assert localize.top_heads(1) == [PLANTED]
    # not a near tie: the planted head's ||A|| clearly leads the runner-up
    assert norms[PLANTED] > 1.3 * norms.flatten().sort(descending=True).values[1]

    def tune(heads):
        module = LoFiT(
            model=copy.deepcopy(student), stage="tune", heads=heads, optimizer=functools.partial(adam, lr=5e-2)
        )
        return _accuracy(_fit(module, train, epochs=8), val)

    recovered = tune(localize.top_heads(1))
    elsewhere = tune([(1, 0)])
    assert corrupted < 0.6
    assert recovered > 0.8 and recovered > corrupted + 0.3
    assert elsewhere < corrupted + 0.1


def test_two_accumulated_half_batches_make_the_step_of_the_whole_batch():
    """Equal answer-token counts per half: the mean of the two halves' means is the whole batch's mean, and
    Lightning divides each half's loss by the accumulation count."""
    ends = []
    for batch_size, accumulate in ((16, 1), (8, 2)):
        torch.manual_seed(0)
        module = LoFiT(config=GPT2, stage="localize", optimizer=functools.partial(torch.optim.SGD, lr=1.0))
        data = _data(num_train=16, batch_size=batch_size)
        data.shuffle = False
        tiny_trainer(max_steps=1, limit_val_batches=0, accumulate_grad_batches=accumulate).fit(module, datamodule=data)
        ends.append(module.intervention.scale.detach())
    torch.manual_seed(0)
    assert not torch.allclose(ends[0], LoFiT(config=GPT2).intervention.scale, atol=1e-4)  # the step moved A
    torch.testing.assert_close(ends[0], ends[1], rtol=1e-5, atol=1e-7)


def test_lofit_refuses_a_model_without_the_attention_layout_in_one_sentence():
    """Through the module, as a user meets it: an encoder-only BERT (its attention output sits in
    ``attention.output.dense``, not inside the attention module) and a model whose config lacks the heads."""
    bert = dict(model_type="bert", num_hidden_layers=1, num_attention_heads=2, hidden_size=8, intermediate_size=8,
                vocab_size=VOCAB, is_decoder=True)  # fmt: skip
    with pytest.raises(
        ValueError, match=r"^LoFiT needs an attention output projection \(.*\), and BertLMHeadModel has none$"
    ):
        LoFiT(config=bert)

    class _Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.o_proj = torch.nn.Linear(8, 8)

    class _NoHeads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = _Attention()
            self.config = type("Config", (), {})()

    with pytest.raises(ValueError, match=r"^LoFiT needs a `num_attention_heads` in its config, and _NoHeads has none$"):
        LoFiT(model=_NoHeads())
