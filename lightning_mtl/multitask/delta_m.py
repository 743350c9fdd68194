"""Delta m %: the mean relative change of every task metric against single-task baselines.

Maninis et al., "Attentive Single-Tasking of Multiple Tasks", CVPR 2019; as used by MTAN, LibMTL,
Nash-MTL and F-MTL::

    Delta m % = 100 / T * sum_t (1 / M_t) * sum_k (-1)^{h_tk} (M_tk - B_tk) / B_tk

with ``B`` the single-task baseline and ``h_tk = 1`` when higher is better. Lower is better (a
negative value means the multi-task model beats the single-task models). LibMTL prints the
opposite sign.
"""

from __future__ import annotations

from collections.abc import Mapping


def delta_m(
    metrics: Mapping[str, Mapping[str, float]],
    baselines: Mapping[str, Mapping[str, float]],
    higher_is_better: Mapping[str, Mapping[str, bool]],
) -> float:
    """Delta m % over the tasks and metrics listed in ``baselines``.

    Args:
        metrics: ``{task: {metric: value}}`` of the multi-task model.
        baselines: ``{task: {metric: single-task value}}``; only these pairs enter the sum.
        higher_is_better: ``{task: {metric: bool}}``.

    Examples:
        >>> round(delta_m({"a": {"acc": 0.9}}, {"a": {"acc": 0.8}}, {"a": {"acc": True}}), 6)
        -12.5
    """
    per_task = []
    for task, base in baselines.items():
        if not base:
            continue
        terms = []
        for name, b in base.items():
            if b == 0:
                raise ValueError(f"baseline of {task}/{name} is 0: Delta m % divides by the baseline")
            sign = -1.0 if higher_is_better[task][name] else 1.0
            terms.append(sign * (metrics[task][name] - b) / b)
        per_task.append(sum(terms) / len(terms))
    if not per_task:
        raise ValueError("Delta m % needs at least one baseline value")
    return 100.0 * sum(per_task) / len(per_task)
