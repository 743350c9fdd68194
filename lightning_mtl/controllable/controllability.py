"""The controllability metric: does moving the preference towards a task raise that task's performance?"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["controllability", "kendall_tau"]


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b rank correlation of two equally long sequences (ties corrected); ``nan`` when either is
    constant."""
    if len(x) != len(y):
        raise ValueError(f"kendall_tau needs sequences of one length, got {len(x)} and {len(y)}")
    concordant = discordant = ties_x = ties_y = 0
    n = len(x)
    for i in range(n):
        for j in range(i + 1, n):
            dx = (x[i] > x[j]) - (x[i] < x[j])
            dy = (y[i] > y[j]) - (y[i] < y[j])
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif dx == dy:
                concordant += 1
            else:
                discordant += 1
    denominator = math.sqrt((concordant + discordant + ties_x) * (concordant + discordant + ties_y))
    return (concordant - discordant) / denominator if denominator > 0 else math.nan


def controllability(
    preferences: Sequence[Sequence[float]],
    performance: Sequence[Sequence[float]],
    higher_is_better: Sequence[bool] | None = None,
) -> float:
    """Rank agreement between task preferences and achieved task performance, in ``[-1, 1]``.

    For each task, Kendall's tau between its preference share and its performance across the preference
    vectors evaluated at one budget, with the sign flipped for a lower-is-better metric (an error that falls
    as the preference rises agrees with it); the mean over the tasks whose preference varies. 1 means
    that raising a task's preference never lowered its performance and always raised it when the preference
    rose; 0 that performance ignores the preference. This definition is ours: the paper (Aich et al., ICCV 2023)
    reports controllability without its definition in the text reachable here (see docs/controllable.md).

    Args:
        preferences: ``[P][T]`` preference vectors.
        performance: ``[P][T]`` the task metrics achieved with the configuration each preference selected.
        higher_is_better: ``[T]`` whether each task's metric is better higher (default: all of them).
    """
    if len(preferences) != len(performance) or any(len(p) != len(q) for p, q in zip(preferences, performance)):
        raise ValueError("preferences and performance must both be [P][T] with the same P and T")
    tasks = len(preferences[0]) if preferences else 0
    if higher_is_better is not None and len(higher_is_better) != tasks:
        raise ValueError(f"higher_is_better has {len(higher_is_better)} entries but there are {tasks} tasks")
    taus = []
    for t in range(tasks):
        sign = 1.0 if higher_is_better is None or higher_is_better[t] else -1.0
        shares, achieved = [p[t] for p in preferences], [sign * q[t] for q in performance]
        if len(set(shares)) < 2:
            continue  # this task's preference never moves: nothing to agree with
        tau = kendall_tau(shares, achieved)
        # the preference moves but the performance does not: it ignores the preference, 0 as stated above
        taus.append(0.0 if math.isnan(tau) else tau)
    if not taus:
        raise ValueError("controllability needs at least one task whose preference varies")
    return sum(taus) / len(taus)
