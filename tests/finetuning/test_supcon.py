"""The supervised contrastive loss against a hand computation, its lower bound and its hard inputs."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_mtl.finetuning import SupConLoss, supervised_contrastive_loss


def _by_hand(rows, labels, tau):
    """The L_out formula with Python loops over anchors, positives and candidates."""
    unit = [[x / math.sqrt(sum(v * v for v in row)) for x in row] for row in rows]

    def sim(i, j):
        return sum(a * b for a, b in zip(unit[i], unit[j])) / tau

    terms = []
    for i in range(len(rows)):
        positives = [p for p in range(len(rows)) if p != i and labels[p] == labels[i]]
        if not positives:
            continue
        denominator = sum(math.exp(sim(i, a)) for a in range(len(rows)) if a != i)
        terms.append(-sum(sim(i, p) - math.log(denominator) for p in positives) / len(positives))
    return sum(terms) / len(terms)


def test_equals_the_hand_computation_and_leaves_out_anchors_without_positives():
    rows = [[1.0, 0.0], [0.6, 0.8], [-1.0, 0.5], [0.0, -2.0], [3.0, 1.0]]
    labels = [0, 0, 1, 1, 2]  # the last sample has no positive: only a negative for the others
    got = supervised_contrastive_loss(torch.tensor(rows), torch.tensor(labels), temperature=0.5)
    assert got.item() == pytest.approx(_by_hand(rows, labels, 0.5), rel=1e-6)
    assert SupConLoss(0.5)(torch.tensor(rows), torch.tensor(labels)).item() == pytest.approx(got.item())


def test_coinciding_classes_give_log_p_plus_the_negatives_weight_and_approach_the_bound():
    """Three samples of class 0 at e1, two of class 1 at e2 (orthogonal): an anchor of class 0 has |P| = 2
    positives at similarity 1/tau and 2 negatives at 0, so its term is log(2 + 2 exp(-1/tau)); class 1:
    log(1 + 3 exp(-1/tau))."""
    e1, e2 = [1.0, 0.0], [0.0, 1.0]
    embeddings = torch.tensor([e1, e1, e1, e2, e2])
    labels = torch.tensor([0, 0, 0, 1, 1])
    for tau in (1.0, 0.1, 0.02):
        expected = (3 * math.log(2 + 2 * math.exp(-1 / tau)) + 2 * math.log(1 + 3 * math.exp(-1 / tau))) / 5
        assert supervised_contrastive_loss(embeddings, labels, tau).item() == pytest.approx(expected, rel=1e-5)
    bound = (3 * math.log(2) + 2 * math.log(1)) / 5
    assert supervised_contrastive_loss(embeddings, labels, 0.02).item() == pytest.approx(bound, abs=1e-6)


def test_the_mean_log_p_bound_holds_for_random_embeddings():
    generator = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    sizes = torch.bincount(labels)[labels].float() - 1
    bound = sizes.log().mean().item()
    for _ in range(20):
        embeddings = torch.randn(9, 4, generator=generator)
        assert supervised_contrastive_loss(embeddings, labels, 0.3).item() >= bound


def test_no_positive_pair_is_zero_with_a_zero_gradient_and_bad_shapes_are_named():
    embeddings = torch.randn(3, 4, requires_grad=True)
    loss = supervised_contrastive_loss(embeddings, torch.tensor([0, 1, 2]))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(embeddings.grad, torch.zeros(3, 4))
    single = torch.randn(1, 4, requires_grad=True)
    supervised_contrastive_loss(single, torch.tensor([0])).backward()
    assert torch.isfinite(single.grad).all()
    with pytest.raises(ValueError, match=r"embeddings must be \[N, d\] and labels \[N\], got \(3, 4\) and \(2,\)"):
        supervised_contrastive_loss(torch.randn(3, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        SupConLoss(0.0)


def test_bfloat16_embeddings_give_a_float32_loss_close_to_the_float32_one():
    embeddings = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    low = supervised_contrastive_loss(embeddings.bfloat16(), labels, 0.5)
    assert low.dtype == torch.float32
    # bfloat16 keeps 8 bits of mantissa: the inputs move by up to 2^-8 relatively
    assert low.item() == pytest.approx(supervised_contrastive_loss(embeddings, labels, 0.5).item(), rel=2e-2)
