"""Continual-learning metrics: hand-computed examples and the official Si-Blurry loops written out."""

from __future__ import annotations

import math
import random

import pytest
import torch

from lightning_mtl.continual.metrics import (
    accuracy_matrix,
    anytime_auc,
    average_accuracy,
    class_accuracy,
    forgetting_last,
    last_accuracy,
)
from tests.fixtures.trainers import one_thread  # noqa: F401

nan = math.nan


def test_anytime_auc_is_the_mean_of_the_periodic_accuracies():
    assert anytime_auc([0.5, 0.7, 0.6]) == pytest.approx(0.6)
    assert anytime_auc(torch.tensor([0.25])) == pytest.approx(0.25)
    assert math.isnan(anytime_auc([]))


def test_anytime_auc_weights_each_accuracy_by_the_samples_since_the_previous_evaluation():
    # area: 0.5 over samples 0-1000, 0.8 over 1000-4000, 0.2 over 4000-5000; divided by 5000
    assert anytime_auc([0.5, 0.8, 0.2], samples=[1000, 4000, 5000]) == pytest.approx((500 + 2400 + 200) / 5000)
    # equal gaps: the plain mean (what the official codes compute)
    accs = [0.1, 0.9, 0.4, 0.3]
    assert anytime_auc(accs, samples=[1000, 2000, 3000, 4000]) == pytest.approx(sum(accs) / 4)


def test_anytime_auc_is_a_right_riemann_sum_of_the_accuracy_curve():
    """Koh et al.'s sum_i f(i * dn) * dn over a curve sampled every dn, normalized by the samples covered."""
    curve = lambda n: 0.3 + 0.5 * math.sin(n / 700.0) ** 2  # noqa: E731
    dn, k = 250, 12
    samples = [dn * i for i in range(1, k + 1)]
    area = sum(curve(n) * dn for n in samples)
    assert anytime_auc([curve(n) for n in samples], samples) == pytest.approx(area / samples[-1])


def test_anytime_auc_input_errors():
    with pytest.raises(ValueError, match="strictly increasing"):
        anytime_auc([0.5, 0.6], samples=[1000, 1000])
    with pytest.raises(ValueError, match="same length"):
        anytime_auc([0.5, 0.6], samples=[1000])
    with pytest.raises(ValueError, match="dimension"):
        anytime_auc([[0.5]])


def test_average_and_last_accuracy():
    assert average_accuracy([0.9, 0.6, 0.45]) == pytest.approx(0.65)
    assert last_accuracy([0.9, 0.6, 0.45]) == pytest.approx(0.45)
    assert math.isnan(average_accuracy([])) and math.isnan(last_accuracy([]))


def test_class_accuracy_marks_unseen_and_empty_classes():
    acc = class_accuracy(torch.tensor([3, 0, 2, 0, 5]), torch.tensor([4, 0, 4, 2, 5]), num_seen=4)
    assert acc[0] == 0.75 and acc[2] == 0.5 and acc[3] == 0.0
    assert math.isnan(acc[1])  # seen but no test sample
    assert math.isnan(acc[4])  # not exposed yet, whatever the counts say
    assert acc.dtype == torch.float64


def test_forgetting_last_hand_example():
    matrix = [
        [0.9, 0.4, nan, nan],  # after task 1: classes 0, 1 seen
        [0.7, 0.6, 0.8, nan],  # after task 2: class 2 appears
        [0.5, 0.7, 0.3, 0.9],  # final: class 3 only now, nothing to forget
    ]
    # class 0: 0.9 - 0.5; class 1: 0.6 - 0.7 (improved: negative); class 2: 0.8 - 0.3
    assert forgetting_last(matrix) == pytest.approx((0.4 - 0.1 + 0.5) / 3)


def test_forgetting_last_official_selection_drops_never_correct_classes():
    matrix = [[0.0, 0.5, nan], [0.0, 0.6, nan], [0.25, 0.2, 1.0]]
    # default: class 0 counts with 0 - 0.25, class 1 with 0.6 - 0.2
    assert forgetting_last(matrix) == pytest.approx((-0.25 + 0.4) / 2)
    # the official code keeps only classes whose best earlier accuracy is > 0
    assert forgetting_last(matrix, exclude_never_correct=True) == pytest.approx(0.4)


def test_forgetting_last_undefined_cases():
    assert math.isnan(forgetting_last([[0.5, 0.4]]))  # one task end
    assert math.isnan(forgetting_last([[nan, nan], [0.4, 0.5]]))  # every class new at the last task end


def _official_forgetting(rows_with_zeros):
    """The Si-Blurry summary loop: unseen classes hold 0, keep classes whose best earlier accuracy is > 0."""
    diffs = []
    for j in range(len(rows_with_zeros[0])):
        best = max(row[j] for row in rows_with_zeros[:-1])
        if best > 0:
            diffs.append(best - rows_with_zeros[-1][j])
    return sum(diffs) / len(diffs) if diffs else nan


@pytest.mark.parametrize("seed", range(5))
def test_forgetting_last_agrees_with_the_official_loop(seed):
    rng = random.Random(seed)
    tasks, classes = rng.randint(2, 5), rng.randint(3, 12)
    exposed = [rng.randrange(tasks) for _ in range(classes)]  # task end from which each class is evaluated
    matrix = [[nan] * classes for _ in range(tasks)]
    for t in range(tasks):
        for c in range(classes):
            if t >= exposed[c]:
                matrix[t][c] = rng.choice([0.0, 0.0, rng.random(), rng.random(), 1.0])
    zeros = [[0.0 if math.isnan(v) else v for v in row] for row in matrix]
    expected = _official_forgetting(zeros)
    got = forgetting_last(matrix, exclude_never_correct=True)
    assert (math.isnan(got) and math.isnan(expected)) or got == pytest.approx(expected)


def test_accuracy_matrix_groups_classes_by_task_of_first_exposure():
    classes = [[1.0, 0.5, nan, nan], [0.5, 0.5, 1.0, 0.0]]
    matrix = accuracy_matrix(classes, class_tasks=[0, 0, 1, 1])
    assert matrix.shape == (2, 2)
    assert matrix[0, 0] == 0.75 and math.isnan(matrix[0, 1])
    assert matrix[1].tolist() == [0.5, 0.5]
    # a class never exposed (-1) is left out; an empty task column stays NaN
    matrix = accuracy_matrix(classes, class_tasks=[0, 2, 2, -1], num_tasks=3)
    assert matrix[1, 0] == 0.5 and math.isnan(matrix[1, 1]) and matrix[1, 2] == 0.75


def test_accuracy_matrix_with_counts_is_the_accuracy_on_the_group_samples():
    correct = torch.tensor([[3, 1, 0], [2, 4, 5]])
    total = torch.tensor([[4, 8, 0], [4, 8, 10]])
    rows = [class_accuracy(c, t, num_seen=2 + i).tolist() for i, (c, t) in enumerate(zip(correct, total))]
    matrix = accuracy_matrix(rows, class_tasks=[0, 0, 1], class_counts=total[-1])
    assert matrix[0, 0] == pytest.approx(4 / 12) and matrix[1, 0] == pytest.approx(6 / 12)
    assert math.isnan(matrix[0, 1]) and matrix[1, 1] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="one entry per class"):
        accuracy_matrix(rows, class_tasks=[0, 1])
