"""Evaluate a trained controllable network over a grid of budgets and preferences, and draw it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lightning_mtl._modes import eval_mode
from lightning_mtl._plotting import figure_class
from lightning_mtl.controllable.controllability import controllability
from lightning_mtl.controllable.sampler import WidthConfig
from lightning_mtl.controllable.search import BudgetSearch, normalize_preference

__all__ = ["controllability_grid", "evaluate_configuration", "metric_choice", "plot_controllability"]


def metric_choice(
    module: Any, metric: str | Mapping[str, str], higher_is_better: Mapping[str, bool] | None = None
) -> tuple[dict[str, str], dict[str, bool]]:
    """Each task's metric name and whether a higher value of it is better.

    ``metric`` is one name for every task (``"acc"``) or ``{task: name}`` (dense tasks: ``{"segmentation":
    "miou", "depth": "abs_err", "normal": "mean_angle"}``). The direction is the torchmetrics metric's own
    ``higher_is_better`` flag unless ``higher_is_better`` names it for the task.

    Raises:
        ValueError: a task without a chosen metric, an unknown task or metric, or a metric whose direction is
            unknown and not given.
    """
    names = list(module.task_names)
    if isinstance(metric, str):
        chosen = dict.fromkeys(names, metric)
    else:
        unknown = sorted(set(metric) - set(names))
        missing = [name for name in names if name not in metric]
        if unknown or missing:
            raise ValueError(f"metric must name one metric per task {names}: unknown {unknown}, missing {missing}")
        chosen = {name: str(metric[name]) for name in names}
    given = dict(higher_is_better or {})
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise ValueError(f"higher_is_better names unknown task(s) {unknown}; the tasks are {names}")
    directions = {}
    for name in names:
        found = module.tasks[name].build_metrics()
        if chosen[name] not in found:
            raise ValueError(f"task {name!r} has no metric {chosen[name]!r}; its metrics are: {', '.join(found)}")
        flag = given.get(name, getattr(found[chosen[name]], "higher_is_better", None))
        if flag is None:
            raise ValueError(
                f"task {name!r}: metric {chosen[name]!r} does not say whether higher is better; "
                f"give higher_is_better={{{name!r}: True or False}}"
            )
        directions[name] = bool(flag)
    return chosen, directions


def evaluate_configuration(
    module: Any, batches: Iterable[Any], config: WidthConfig, metric: str | Mapping[str, str]
) -> dict[str, float]:
    """Each task's metric (one of its task's torchmetrics: one name for all, e.g. ``"acc"``, or ``{task:
    name}``) over ``batches`` at ``config``."""
    # the direction plays no part in reading a value: every task's is given, so none is asked for
    chosen, _ = metric_choice(module, metric, dict.fromkeys(module.task_names, True))
    kept = module.configuration
    module.set_configuration(config)
    metrics = {name: module.tasks[name].build_metrics()[chosen[name]] for name in module.task_names}
    device = next(module.parameters()).device
    try:
        with torch.no_grad(), eval_mode(module):
            for batch in batches:
                inputs, targets = module.unpack_batch(batch)
                inputs = inputs.to(device)
                targets = {k: v.to(device) for k, v in targets.items()}
                preds = module(inputs)
                _, checked = module.task_losses(preds, targets, "val")
                for name in module.task_names:
                    metrics[name] = metrics[name].to(device)
                    module.tasks[name].update_metrics({chosen[name]: metrics[name]}, preds[name], checked[name])
    finally:
        module.set_configuration(kept)
    return {name: float(metrics[name].compute()) for name in module.task_names}


def controllability_grid(
    module: Any,
    batches: Sequence[Any],
    preferences: Sequence[Sequence[float]],
    budgets: Sequence[float],
    metric: str | Mapping[str, str] = "acc",
    search: BudgetSearch | None = None,
    higher_is_better: Mapping[str, bool] | None = None,
) -> dict[str, Any]:
    """The configuration the search picks for every (budget, preference), its FLOPs and task metrics, the
    controllability at each budget and their mean.

    Each task's metric counts in its own direction (:func:`metric_choice`): a lower-is-better one (depth error,
    normal angle) agrees with the preference when it falls as the task's preference rises.

    Returns:
        ``{"rows": [{"budget", "preference", "config", "flops", "metrics"}], "controllability": {budget: value},
        "mean_controllability": value, "metric": {task: name}, "higher_is_better": {task: bool}, "max_flops"}``.
    """
    chosen, directions = metric_choice(module, metric, higher_is_better)
    if search is None:
        first = module.unpack_batch(batches[0])[0][:1]
        search = BudgetSearch(module, first.to(next(module.parameters()).device))
    cache: dict[tuple[float, ...], dict[str, float]] = {}
    rows, per_budget = [], {}
    for budget in budgets:
        shares_at, achieved = [], []
        for preference in preferences:
            shares = normalize_preference(preference, module.task_names)
            config = search.search(budget, shares)
            key = tuple(config.values())
            if key not in cache:
                cache[key] = evaluate_configuration(module, batches, config, chosen)
            values = cache[key]
            rows.append({"budget": budget, "preference": [shares[n] for n in module.task_names], "config": config,
                         "flops": search.flops(config), "metrics": values})  # fmt: skip
            shares_at.append([shares[n] for n in module.task_names])
            achieved.append([values[n] for n in module.task_names])
        per_budget[budget] = controllability(shares_at, achieved, [directions[n] for n in module.task_names])
    mean = sum(per_budget.values()) / len(per_budget)
    return {"rows": rows, "controllability": per_budget, "mean_controllability": mean, "metric": chosen,
            "higher_is_better": directions, "max_flops": search.max_flops}  # fmt: skip


def plot_controllability(grid: dict[str, Any], path: str | Path, task_names: Sequence[str]) -> Path | None:
    """Budget (FLOPs of the chosen configuration / widest) against each task's metric, one line per preference,
    one panel per task, saved as a PNG. Returns None when matplotlib is missing (the plots extra)."""
    figure_type = figure_class()
    if figure_type is None:
        return None
    figure = figure_type(figsize=(4.2 * len(task_names), 3.4))
    axes = figure.subplots(1, len(task_names), squeeze=False)[0]
    preferences = sorted({tuple(row["preference"]) for row in grid["rows"]}, reverse=True)
    for ax, name in zip(axes, task_names):
        for preference in preferences:
            rows = sorted((r for r in grid["rows"] if tuple(r["preference"]) == preference), key=lambda r: r["budget"])
            label = "/".join(f"{p:.1f}" for p in preference)
            ax.plot([r["flops"] / grid["max_flops"] for r in rows], [r["metrics"][name] for r in rows],
                    marker="o", label=f"pref {label}")  # fmt: skip
        ax.set_title(f"task {name}")
        ax.set_xlabel("FLOPs / widest")
        higher = grid.get("higher_is_better", {}).get(name, True)
        ax.set_ylabel(f"{grid['metric'][name]} ({'higher' if higher else 'lower'} is better)")
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7, title="/".join(task_names), title_fontsize=7)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path
