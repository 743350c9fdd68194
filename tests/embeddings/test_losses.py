"""Embedding losses against formulas written out element by element, and MNR against sentence-transformers'
``MultipleNegativesRankingLoss`` on the same embeddings."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_mtl.embeddings import (
    CosineSimilarityLoss,
    MNRLoss,
    MNRPlusLoss,
    cosine_similarity_loss,
    create_loss,
    list_losses,
    mnr_loss,
    mnr_plus_loss,
)


def _sim(u, v, similarity):
    dot = sum(x * y for x, y in zip(u, v))
    if similarity == "dot":
        return dot
    return dot / math.sqrt(sum(x * x for x in u) * sum(y * y for y in v))


def _ce(row, target):
    """-log softmax(row)[target], by hand."""
    top = max(row)
    return -(row[target] - top - math.log(sum(math.exp(r - top) for r in row)))


def _embeddings(b=4, d=5, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, d, generator=g, dtype=torch.float64), torch.randn(b, d, generator=g, dtype=torch.float64),
            torch.randn(b, k, d, generator=g, dtype=torch.float64))  # fmt: skip


@pytest.mark.parametrize("similarity", ["cosine", "dot"])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("with_negatives", [False, True])
def test_mnr_equals_the_hand_formula(similarity, symmetric, with_negatives):
    a, p, n = _embeddings()
    scale = 7.0
    A, P = a.tolist(), p.tolist()
    candidates = P + ([row for anchor in n.tolist() for row in anchor] if with_negatives else [])
    forward = [_ce([scale * _sim(A[i], c, similarity) for c in candidates], i) for i in range(len(A))]
    expected = sum(forward) / len(A)
    if symmetric:
        backward = [_ce([scale * _sim(P[i], x, similarity) for x in A], i) for i in range(len(A))]
        expected = (expected + sum(backward) / len(A)) / 2
    got = mnr_loss(a, p, n if with_negatives else None, scale, similarity, symmetric)
    assert got.item() == pytest.approx(expected, rel=1e-10)  # float64 on both sides
    module = MNRLoss(scale, similarity, symmetric)
    assert module(a, p, n if with_negatives else None).item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("with_negatives", [False, True])
def test_mnr_equals_sentence_transformers(symmetric, with_negatives):
    losses = pytest.importorskip("sentence_transformers.sentence_transformer.losses")
    a, p, n = (t.float() for t in _embeddings(b=6, d=8, k=3, seed=1))
    kwargs = {"directions": ("query_to_doc", "doc_to_query"), "partition_mode": "per_direction"} if symmetric else {}
    theirs = losses.MultipleNegativesRankingLoss(torch.nn.Identity(), scale=20.0, **kwargs)
    columns = [a, p, *n.unbind(1)] if with_negatives else [a, p]
    expected = theirs.compute_loss_from_embeddings(columns, None)
    ours = mnr_loss(a, p, n if with_negatives else None, symmetric=symmetric)
    # float32 on both sides, summed in different orders
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


def test_mnr_gradient_of_the_hard_negatives_is_their_softmax_mix_of_anchors():
    a, p, n = _embeddings()
    p.requires_grad_(True)
    n.requires_grad_(True)
    mnr_loss(a, p, n, scale=1.0, similarity="dot").backward()
    # the hard negatives only ever enter through the denominator: their gradient is a positive mix of anchors
    logits = a @ torch.cat([p, n.flatten(0, 1)]).T
    soft = logits.softmax(1)[:, 4:] / 4
    expected = (soft.T @ a).view(4, 2, 5)
    torch.testing.assert_close(n.grad, expected)


@pytest.mark.parametrize("similarity", ["cosine", "dot"])
def test_mnr_plus_equals_the_hand_formula(similarity):
    a, p, _ = _embeddings(seed=3)
    A, P = a.tolist(), p.tolist()
    b = len(A)
    within = [[(_sim(A[i], A[j], similarity) + _sim(P[i], P[j], similarity)) / 2 for j in range(b)] for i in range(b)]
    rows = [max(range(b), key=lambda j, i=i: within[i][j]) for i in range(b)]
    cols = [max(range(b), key=lambda j, i=i: within[j][i]) for i in range(b)]
    scale = 3.0
    logits = [[scale * _sim(A[i], P[j], similarity) for j in range(b)] for i in range(b)]
    expected = sum(_ce(logits[i], rows[i]) for i in range(b)) / b
    expected += sum(_ce([logits[j][i] for j in range(b)], cols[i]) for i in range(b)) / b
    assert mnr_plus_loss(a, p, scale, similarity).item() == pytest.approx(expected, rel=1e-10)
    assert MNRPlusLoss(scale, similarity)(a, p).item() == pytest.approx(expected, rel=1e-10)


def test_mnr_plus_targets_leave_the_diagonal_when_rows_repeat():
    """Raw dot products: a long anchor row is its neighbours' argmax, so the targets are not the
    diagonal and mnr_plus differs from the symmetric MNR (summed)."""
    a = torch.tensor([[1.0, 0.0], [5.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    p = torch.tensor([[1.0, 0.1], [4.0, 0.0], [0.1, 1.0]], dtype=torch.float64)
    targets = ((a @ a.T + p @ p.T) / 2).argmax(1)
    assert targets.tolist() == [1, 1, 2]
    ce = torch.nn.functional.cross_entropy
    expected = ce(a @ p.T, targets) + ce(p @ a.T, targets)  # the within-similarity is symmetric here
    assert mnr_plus_loss(a, p).item() == pytest.approx(expected.item(), rel=1e-12)
    assert mnr_plus_loss(a, p).item() != pytest.approx(
        2 * mnr_loss(a, p, similarity="dot", scale=1.0, symmetric=True).item()
    )


def test_cosine_similarity_loss_equals_the_hand_formula():
    a, b, _ = _embeddings(seed=5)
    target = torch.tensor([0.5, -0.2, 1.0, 0.0], dtype=torch.float64)
    expected = sum((_sim(x, y, "cosine") - t) ** 2 for x, y, t in zip(a.tolist(), b.tolist(), target.tolist())) / 4
    assert cosine_similarity_loss(a, b, target).item() == pytest.approx(expected, rel=1e-6)  # computed in float32
    assert CosineSimilarityLoss()(a, b, target).item() == pytest.approx(expected, rel=1e-6)


def test_bf16_inputs_are_scored_in_float32():
    a, p, n = (t.float() for t in _embeddings())
    low = mnr_loss(a.bfloat16(), p.bfloat16(), n.bfloat16())
    assert low.dtype == torch.float32
    # the bf16 rounding of the inputs (relative 2^-8) moves cosine x 20 logits by about 0.1 at most
    assert low.item() == pytest.approx(mnr_loss(a, p, n).item(), abs=0.2)


@pytest.mark.parametrize("name", list_losses())
def test_registry_builds_every_loss_and_names_unknown_ones(name):
    a, p, _ = _embeddings()
    loss = create_loss(name, scale=2.0)
    assert loss(a, p).dim() == 0 and loss.registry_name == name
    with pytest.raises(ValueError, match="unknown loss 'mnr_pluss'; did you mean mnr_plus"):
        create_loss("mnr_pluss")


def test_bad_input_gives_one_sentence():
    a, p, n = _embeddings()
    with pytest.raises(ValueError, match=r"anchors and positives must both be \[batch, dim\]"):
        mnr_loss(a, p[:3])
    with pytest.raises(ValueError, match=r"negatives must be \[batch, k, dim\]"):
        mnr_loss(a, p, n[:2])
    with pytest.raises(ValueError, match="similarity must be 'cosine' or 'dot', got 'l2'"):
        MNRLoss(similarity="l2")
    with pytest.raises(ValueError, match="mnr_plus takes no hard negatives"):
        MNRPlusLoss()(a, p, n)
