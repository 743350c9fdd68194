"""The language-model losses on answer tokens, against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_mtl.finetuning import answer_token_accuracy, dpo_loss, sequence_log_probs, sft_loss


def _case():
    # 2 sequences of 4 tokens over a vocabulary of 3; answers: tokens 2-3 of the first, token 3 of the second
    logits = torch.tensor([[[0.0, 1.0, 2.0], [1.0, 0.0, 0.0], [0.0, 0.0, 3.0], [9.0, 9.0, 9.0]],
                           [[2.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 5.0, 0.0], [9.0, 9.0, 9.0]]])  # fmt: skip
    labels = torch.tensor([[-100, -100, 0, 2], [-100, -100, -100, 1]])
    return logits, labels


def _log_softmax(row, index):
    return row[index] - math.log(sum(math.exp(x) for x in row))


def test_sft_loss_and_log_probs_use_the_previous_position_and_only_the_answers():
    logits, labels = _case()
    # first: position 1 predicts label 0, position 2 predicts label 2; second: position 2 predicts label 1
    terms = [_log_softmax([1.0, 0.0, 0.0], 0), _log_softmax([0.0, 0.0, 3.0], 2), _log_softmax([0.0, 5.0, 0.0], 1)]
    assert sft_loss(logits, labels).item() == pytest.approx(-sum(terms) / 3, rel=1e-6)
    expected = torch.tensor([terms[0] + terms[1], terms[2]])
    torch.testing.assert_close(sequence_log_probs(logits, labels), expected)
    assert answer_token_accuracy(logits, labels).item() == 1.0
    labels[1, 3] = 0  # the second answer is now predicted wrongly
    assert answer_token_accuracy(logits, labels).item() == pytest.approx(2 / 3)


def test_dpo_loss_is_minus_log_sigmoid_of_beta_times_the_margin_difference():
    policy_c, policy_r = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0])
    ref_c, ref_r = torch.tensor([-1.5, -2.0]), torch.tensor([-2.0, -2.0])
    margins = [(-1.0 + 1.5) - (-3.0 + 2.0), (-2.0 + 2.0) - (-1.0 + 2.0)]  # 1.5 and -1
    expected = sum(math.log1p(math.exp(-0.5 * m)) for m in margins) / 2
    assert dpo_loss(policy_c, policy_r, ref_c, ref_r, beta=0.5).item() == pytest.approx(expected, rel=1e-6)
    # policy == reference: log 2 whatever beta
    assert dpo_loss(ref_c, ref_r, ref_c, ref_r, beta=3.0).item() == pytest.approx(math.log(2))


def test_logits_and_labels_of_different_shapes_are_refused():
    logits, labels = _case()
    with pytest.raises(ValueError, match=r"logits \(2, 4, 3\) and labels \(2, 3\) disagree"):
        sft_loss(logits, labels[:, :3])
