"""The LoFiT head intervention: the formula on fixed tensors and inside every supported decoder, the identity
at zero, head masks, the saved file and the one-sentence error for a model without the layout."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_mtl.finetuning import LoFiTIntervention, build_causal_lm, find_attention_projections, load_intervention
from tests.finetuning._models import CONFIGS, VOCAB, head_dim


def _ids(batch=3, length=10, seed=0):
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _random_intervention(layers, heads, dim, seed=0):
    generator = torch.Generator().manual_seed(seed)
    intervention = LoFiTIntervention(layers, heads, dim)
    with torch.no_grad():
        intervention.scale.copy_(torch.randn(layers, heads, dim, generator=generator))
        intervention.offset.copy_(torch.randn(layers, heads, dim, generator=generator))
    return intervention


def _per_head_loop(z, scale, offset, heads):
    """The official code's form: one slice per head, written one after the other."""
    out = z.clone()
    dim = scale.shape[-1]
    for i in heads:
        block = slice(i * dim, (i + 1) * dim)
        out[..., block] = (1 + scale[i]) * z[..., block] + offset[i]
    return out


def test_edit_equals_the_formula_on_hand_picked_numbers():
    intervention = LoFiTIntervention(1, 2, 2)
    with torch.no_grad():
        intervention.scale.copy_(torch.tensor([[[0.5, -1.0], [2.0, 0.0]]]))
        intervention.offset.copy_(torch.tensor([[[1.0, 2.0], [-3.0, 0.25]]]))
    z = torch.tensor([[2.0, 4.0, 1.0, -8.0]])
    # head 0: (1.5 * 2 + 1, 0 * 4 + 2); head 1: (3 * 1 - 3, 1 * -8 + 0.25)
    assert torch.equal(intervention.edit(0, z), torch.tensor([[4.0, 2.0, 0.0, -7.75]]))
    intervention.select_heads([(0, 1)])  # head 0 passes through untouched
    assert torch.equal(intervention.edit(0, z), torch.tensor([[2.0, 4.0, 0.0, -7.75]]))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_zero_intervention_leaves_the_logits_bit_identical(name):
    model = build_causal_lm(config=CONFIGS[name]).eval()
    ids = _ids()
    with torch.no_grad():
        before = model(input_ids=ids).logits
        intervention = LoFiTIntervention(2, 4, head_dim(name)).attach(model)
        after = model(input_ids=ids).logits
        with torch.no_grad():
            intervention.offset[1, 2, 0] = 1.0  # and a non-zero one does change them: the hook is live
        changed = model(input_ids=ids).logits
    assert torch.equal(before, after)
    assert not torch.equal(before, changed)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_projection_receives_the_formula_of_every_head(name):
    """Pre-hooks run in the order they were registered: one installed before the intervention sees the heads'
    outputs, one installed after it sees what the output projection receives; in every layer the second
    equals the per-head loop applied to the first."""
    model = build_causal_lm(config=CONFIGS[name]).eval()
    layout = find_attention_projections(model)
    raw: dict[int, torch.Tensor] = {}
    seen: dict[int, torch.Tensor] = {}
    for layer, projection in enumerate(layout.projections):
        projection.register_forward_pre_hook(lambda m, args, layer=layer: raw.__setitem__(layer, args[0].clone()))
    intervention = _random_intervention(2, 4, head_dim(name)).attach(model)
    for layer, projection in enumerate(layout.projections):
        projection.register_forward_pre_hook(lambda m, args, layer=layer: seen.__setitem__(layer, args[0].clone()))
    with torch.no_grad():
        model(input_ids=_ids())
    for layer in range(2):
        scale, offset = intervention.scale[layer].detach(), intervention.offset[layer].detach()
        expected = _per_head_loop(raw[layer], scale, offset, range(4))
        # the fused multiply-add may round once where the loop rounds twice
        torch.testing.assert_close(seen[layer], expected, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(seen[layer], raw[layer])


def test_heads_outside_the_mask_pass_through_bit_for_bit_and_get_no_gradient():
    intervention = _random_intervention(2, 4, 8)
    intervention.select_heads([(1, 2)])
    z = torch.randn(3, 5, 32)
    out = intervention.edit(1, z)
    untouched = [slice(0, 16), slice(24, 32)]
    for block in untouched:
        assert torch.equal(out[..., block], z[..., block])
    assert torch.equal(intervention.edit(0, z), z)  # no head of layer 0 is selected
    out.square().sum().backward()
    grad = intervention.offset.grad
    assert grad is not None
    assert torch.count_nonzero(grad) == torch.count_nonzero(grad[1, 2]) == 8


def test_bfloat16_activations_stay_bfloat16_and_a_zero_intervention_is_still_the_identity():
    model = build_causal_lm(config=CONFIGS["llama"]).to(torch.bfloat16).eval()
    ids = _ids()
    with torch.no_grad():
        before = model(input_ids=ids).logits
        LoFiTIntervention(2, 4, 8).attach(model)
        after = model(input_ids=ids).logits
    assert after.dtype == torch.bfloat16
    assert torch.equal(before, after)


def test_the_saved_file_is_small_and_loads_onto_the_base_model(tmp_path):
    model = build_causal_lm(config=CONFIGS["qwen2"]).eval()
    intervention = _random_intervention(2, 4, 8).attach(model)
    intervention.select_heads([(1, 3), (0, 1)])
    ids = _ids()
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    intervention.save(tmp_path / "lofit.pt")
    assert (tmp_path / "lofit.pt").stat().st_size < 4096  # two heads x 2 x 8 numbers, plus the header

    base = build_causal_lm(config=CONFIGS["qwen2"]).eval()  # the same seed: the same base weights
    loaded = load_intervention(base, tmp_path / "lofit.pt")
    assert loaded.selected_heads() == [(0, 1), (1, 3)]
    with torch.no_grad():
        assert torch.equal(base(input_ids=ids).logits, trained)
    loaded.detach()  # and back to the base model
    with torch.no_grad():
        intervention.detach()
        assert torch.equal(base(input_ids=ids).logits, model(input_ids=ids).logits)


def test_a_saved_ranking_keeps_its_order(tmp_path):
    intervention = _random_intervention(2, 4, 8)
    intervention.save(tmp_path / "heads.pt", [(1, 2), (0, 3), (1, 0)])
    assert LoFiTIntervention.read(tmp_path / "heads.pt")["heads"].tolist() == [[1, 2], [0, 3], [1, 0]]


def test_rank_heads_orders_by_the_norm_of_the_scale():
    intervention = LoFiTIntervention(2, 3, 2)
    with torch.no_grad():
        intervention.scale[0, 1] = torch.tensor([3.0, 4.0])  # norm 5
        intervention.scale[1, 2] = torch.tensor([-6.0, 0.0])  # norm 6: the sign does not matter
        intervention.scale[1, 0] = torch.tensor([1.0, 1.0])
    assert intervention.rank_heads(3) == [(1, 2), (0, 1), (1, 0)]


def test_a_model_without_the_attention_layout_is_named_in_one_sentence():
    bert = build_causal_lm(config=dict(model_type="bert", num_hidden_layers=1, num_attention_heads=2, hidden_size=8,
                                       intermediate_size=8, vocab_size=VOCAB, is_decoder=True))  # fmt: skip
    with pytest.raises(
        ValueError, match=r"LoFiT needs an attention output projection \(o_proj / c_proj.*BertLMHeadModel has none"
    ):
        find_attention_projections(bert)
    with pytest.raises(ValueError, match="Sequential has none"):
        LoFiTIntervention(1, 1, 1).attach(nn.Sequential(nn.Linear(2, 2)))


def test_an_intervention_of_another_shape_or_a_second_attach_is_refused(tmp_path):
    model = build_causal_lm(config=CONFIGS["gpt2"])
    with pytest.raises(ValueError, match=r"\(layers, heads, head_dim\) = \(2, 4, 8\), the intervention \(2, 2, 16\)"):
        LoFiTIntervention(2, 2, 16).attach(model)
    intervention = LoFiTIntervention(2, 4, 8).attach(model)
    with pytest.raises(ValueError, match="attached to a model already"):
        intervention.attach(model)
    with pytest.raises(FileNotFoundError, match="no LoFiT intervention file at"):
        load_intervention(model, tmp_path / "missing.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="is not a LoFiT intervention file"):
        load_intervention(model, tmp_path / "other.pt")
