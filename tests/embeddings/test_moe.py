"""MoE surgery with enforced routing: the untrained surgery computes what the dense model computes for every
routing, expert j gets no gradient from samples routed elsewhere, each routed sample equals a dense model
holding that expert's weights, and models without a known feed-forward layout are refused."""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_mtl.embeddings import EnforcedRoutingExperts, moe_surgery, routing
from tests.embeddings._models import LAYOUTS, tiny_model, token_batch

pytest.importorskip("transformers")


def _blocks(model):
    return [m for m in model.modules() if isinstance(m, EnforcedRoutingExperts)]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_untrained_surgery_equals_the_dense_model_for_every_routing(layout):
    dense = tiny_model(layout)
    moe = moe_surgery(copy.deepcopy(dense), 3)
    assert len(_blocks(moe)) == 2  # one per layer (BERT's intermediate + output joined)
    ids, mask = token_batch()
    expected = dense(input_ids=ids, attention_mask=mask).last_hidden_state
    for route in ([0, 0, 0, 0, 0, 0], [2, 1, 0, 2, 1, 0], [0, 0, 1, 1, 2, 2], [1, 2, 1, 2, 1, 2]):
        with routing(moe, torch.tensor(route)):
            got = moe(input_ids=ids, attention_mask=mask).last_hidden_state
        # float64; experts see sub-batches, so the matmuls may round differently
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_expert_j_gets_no_gradient_from_domain_i_and_each_route_is_its_experts_dense_model(layout):
    moe = moe_surgery(tiny_model(layout), 3)
    with torch.no_grad():  # make the experts differ, so that a wrong route would show
        for block in _blocks(moe):
            for expert in block.experts:
                for p in expert.parameters():
                    p.add_(0.1 * torch.randn_like(p))
    ids, mask = token_batch()
    route = torch.tensor([2, 0, 2, 0, 0, 2])  # expert 1 unused
    with routing(moe, route):
        out = moe(input_ids=ids, attention_mask=mask).last_hidden_state
    (out[route == 0].square().sum()).backward()  # only domain 0's rows enter the loss
    for block in _blocks(moe):
        # expert 1 served nobody; expert 2 served rows outside the loss: exactly zero, not just small
        assert all(p.grad is None or not p.grad.any() for e in (1, 2) for p in block.experts[e].parameters())
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in block.experts[0].parameters())

    # sample i through the MoE equals sample i through a dense model whose blocks are expert route[i]
    for expert in (0, 2):
        dense = copy.deepcopy(moe)
        for block in _blocks(dense):
            block.experts = torch.nn.ModuleList([block.experts[expert]])
        with routing(dense, 0):
            alone = dense(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(out[route == expert], alone[route == expert], rtol=1e-12, atol=1e-12)


def test_routing_errors_are_one_sentence():
    moe = moe_surgery(tiny_model("bert"), 2)
    ids, mask = token_batch()
    with pytest.raises(RuntimeError, match="ran without routing ids"):
        moe(input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match="routing id 2 is out of range for 2 experts"):
        with routing(moe, torch.tensor([0, 1, 2, 0, 0, 0])):
            pass
    with pytest.raises(RuntimeError, match="got 3 routing ids but the block sees 6 rows"):
        with routing(moe, torch.tensor([0, 1, 0])):
            moe(input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match="already holds mixture-of-experts blocks"):
        moe_surgery(moe, 2)
    with pytest.raises(ValueError, match="num_experts must be at least 1"):
        moe_surgery(tiny_model("bert"), 0)


def test_a_model_without_a_known_feed_forward_block_is_refused_by_name():
    import transformers

    gpt2 = transformers.GPT2Model(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="found no feed-forward block in GPT2Model: it looks for .*`intermediate`"):
        moe_surgery(gpt2, 2)
