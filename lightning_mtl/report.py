"""Compare runs: per-task metrics and Delta m % against single-task runs, as Markdown, CSV and a bar chart.

::

    python -m lightning_mtl.report runs/nyuv2_pcgrad runs/nyuv2_mgda \\
        --baselines runs/nyuv2_single_segmentation runs/nyuv2_single_depth runs/nyuv2_single_normal --out report/

A run folder is anything holding a CSV logger's ``metrics.csv`` (``<save_dir>/<name>/version_<k>/``) or a
W&B offline run (``wandb/offline-run-*/files/wandb-summary.json``); a folder with several runs inside
yields one row per run. Of the logged keys ``<stage>/<task>/<metric>`` the report keeps the last value
(``--stage test`` by default, falling back to ``val`` for a run without test metrics); losses and the
``mean`` pseudo-task are left out.

Single-task runs given with ``--baselines`` provide ``B_tk`` for Delta m % (Maninis et al., CVPR 2019; see
:func:`lightning_mtl.multitask.delta_m.delta_m`; lower is better). Whether higher is better is known for
the metrics of this package's tasks (``acc``, ``f1``, ``miou``, ``pixel_acc``, ``within_*`` higher; errors
and angles lower); ``--higher NAME`` marks further metric names as higher-is-better.

Writes ``report.md``, ``report.csv`` and ``report.png`` (Delta m % per run, then one panel per metric).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lightning_mtl.multitask.delta_m import delta_m

__all__ = ["Run", "build_rows", "find_runs", "higher_is_better", "main", "write_report"]

_HIGHER = {"acc", "f1", "miou", "pixel_acc", "auroc", "precision", "recall", "r2"}
_LOWER = {"abs_err", "rel_err", "mean_angle", "median_angle", "mae", "mse", "rmse", "loss"}


def higher_is_better(metric: str, extra_higher: Iterable[str] = ()) -> bool:
    """Direction of a metric by its name."""
    if metric in extra_higher or metric in _HIGHER or metric.startswith("within_"):
        return True
    if metric in _LOWER:
        return False
    raise ValueError(
        f"the report does not know whether metric {metric!r} is better higher or lower; pass --higher {metric} "
        "if higher is better; other unknown metrics are not guessed"
    )


@dataclass
class Run:
    """One run: a label, its source file and its last logged value of every metric key."""

    name: str
    source: str
    values: dict[str, float] = field(default_factory=dict)

    def task_metrics(self, stage: str) -> dict[str, dict[str, float]]:
        """``{task: {metric: value}}`` for ``stage`` (``mean`` and losses left out)."""
        out: dict[str, dict[str, float]] = {}
        for key, value in self.values.items():
            parts = key.split("/")
            if len(parts) != 3 or parts[0] != stage or parts[1] == "mean" or parts[2] == "loss":
                continue
            out.setdefault(parts[1], {})[parts[2]] = value
        return out

    def stage(self, preferred: str) -> str:
        """``preferred`` if the run logged any task metric for it, else the other of test / val."""
        if self.task_metrics(preferred):
            return preferred
        other = "val" if preferred == "test" else "test"
        return other if self.task_metrics(other) else preferred


def _read_csv(path: Path) -> dict[str, float]:
    """Last non-empty numeric value of every column of a Lightning CSV logger's ``metrics.csv``."""
    values: dict[str, float] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            for key, cell in row.items():
                if key is None or cell in (None, ""):
                    continue
                try:
                    values[key] = float(cell)
                except ValueError:
                    continue
    return values


def _read_wandb(path: Path) -> dict[str, float]:
    """Numeric top-level entries of a W&B ``wandb-summary.json``."""
    with open(path) as f:
        summary = json.load(f)
    return {k: float(v) for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def find_runs(path: str | os.PathLike[str]) -> list[Run]:
    """Every run under ``path`` (the folder itself, or a metrics file), labelled by its folder."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"run folder {root} does not exist")
    if root.is_file():
        files = [root]
    else:
        files = sorted(root.rglob("metrics.csv")) + sorted(root.rglob("wandb-summary.json"))
    runs = []
    for file in files:
        if file.name == "metrics.csv":
            values, folder = _read_csv(file), file.parent
        else:
            values, folder = _read_wandb(file), file.parent
            if folder.name == "files":  # wandb/offline-run-<time>-<id>/files/wandb-summary.json
                folder = folder.parent
        try:
            relative = folder.relative_to(root)
            label = root.name if str(relative) == "." else f"{root.name}/{relative}"
        except ValueError:
            label = folder.name
        runs.append(Run(label, str(file), values))
    if not runs:
        raise FileNotFoundError(
            f"no run found under {root}: expected a CSV logger's metrics.csv or a W&B offline run "
            "(wandb/offline-run-*/files/wandb-summary.json)"
        )
    return runs


def _baseline_values(baselines: Sequence[Run], stage: str) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for run in baselines:
        for task, metrics in run.task_metrics(run.stage(stage)).items():
            for metric, value in metrics.items():
                if metric in out.get(task, {}) and out[task][metric] != value:
                    raise ValueError(f"two baseline runs give {task}/{metric}; pass one single-task run per task")
                out.setdefault(task, {})[metric] = value
    return out


def build_rows(
    runs: Sequence[Run], baselines: Sequence[Run] = (), stage: str = "test", extra_higher: Iterable[str] = ()
) -> tuple[list[str], list[dict[str, object]]]:
    """The table: column names (``task/metric``..., ``delta_m``) and one row per run (baselines first)."""
    extra = set(extra_higher)
    base = _baseline_values(baselines, stage)
    rows: list[dict[str, object]] = []
    columns: list[str] = []
    for kind, group in (("single-task", baselines), ("multi-task", runs)):
        for run in group:
            used = run.stage(stage)
            metrics = run.task_metrics(used)
            row: dict[str, object] = {"run": run.name, "kind": kind, "stage": used}
            for task in sorted(metrics):
                for metric in sorted(metrics[task]):
                    key = f"{task}/{metric}"
                    row[key] = metrics[task][metric]
                    if key not in columns:
                        columns.append(key)
            if base and kind == "multi-task":
                shared = {t: {m: v for m, v in ms.items() if m in metrics.get(t, {})} for t, ms in base.items()}
                shared = {t: ms for t, ms in shared.items() if ms}
                if shared:
                    directions = {t: {m: higher_is_better(m, extra) for m in ms} for t, ms in shared.items()}
                    row["delta_m"] = delta_m(metrics, shared, directions)
            rows.append(row)
    if base and any("delta_m" in r for r in rows):
        columns.append("delta_m")
    return columns, rows


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4f}"
    return "" if value is None else str(value)


def write_report(columns: list[str], rows: list[dict[str, object]], out: str | os.PathLike[str]) -> dict[str, Path]:
    """Write ``report.md``, ``report.csv`` and ``report.png`` into ``out``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    header = ["run", "kind", "stage", *columns]
    paths = {"md": out / "report.md", "csv": out / "report.csv", "png": out / "report.png"}
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for row in rows:
            writer.writerow([row.get(c, "") for c in header])
    titles = [c.replace("delta_m", "Delta m % (lower is better)") for c in header]
    lines = ["| " + " | ".join(titles) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(row.get(c)) for c in header) + " |" for row in rows]
    paths["md"].write_text("\n".join(lines) + "\n")
    _plot(columns, rows, paths["png"])
    return paths


def _plot(columns: list[str], rows: list[dict[str, object]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("the report's chart needs matplotlib: pip install \"lightning-mtl[plots]\" (or matplotlib)") from error
    panels = (["delta_m"] if "delta_m" in columns else []) + [c for c in columns if c != "delta_m"][:11]
    cols = min(3, max(1, len(panels)))
    nrows = math.ceil(len(panels) / cols) or 1
    fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3.2 * nrows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, column in zip(axes.flat, panels):
        shown = [r for r in rows if isinstance(r.get(column), float)]
        names = [str(r["run"]) for r in shown]
        values = [float(r[column]) for r in shown]  # type: ignore[arg-type]
        colors = ["#9aa5b1" if r["kind"] == "single-task" else "#3b7dd8" for r in shown]
        if column == "delta_m":
            colors = ["#2e9e5b" if v < 0 else "#d0473c" for v in values]
        ax.bar(range(len(values)), values, color=colors)
        ax.set_xticks(range(len(values)), names, rotation=30, ha="right", fontsize=7)
        ax.set_title("Delta m % (lower is better)" if column == "delta_m" else column, fontsize=9)
        if column == "delta_m":
            ax.axhline(0.0, color="black", linewidth=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_mtl report",
        description="Per-task metrics and Delta m %% of runs (CSV logger or W&B offline folders): "
        "writes report.md, report.csv and report.png.",
    )
    parser.add_argument("runs", nargs="+", help="run folders (multi-task runs)")
    parser.add_argument("--baselines", nargs="*", default=[], help="single-task run folders for Delta m %%")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--stage", choices=("test", "val"), default="test", help="which logged metrics to report")
    parser.add_argument("--higher", nargs="*", default=[], help="further metric names where higher is better")
    args = parser.parse_args(argv)
    runs = [run for path in args.runs for run in find_runs(path)]
    baselines = [run for path in args.baselines for run in find_runs(path)]
    columns, rows = build_rows(runs, baselines, stage=args.stage, extra_higher=args.higher)
    paths = write_report(columns, rows, args.out)
    print(paths["md"].read_text(), end="")
    print(f"wrote {paths['md']}, {paths['csv']} and {paths['png']}")
    return paths


if __name__ == "__main__":
    main()
