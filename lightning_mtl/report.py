"""Compare runs: per-task metrics and Delta m % against single-task runs, as Markdown, CSV and a bar chart.

::

    python -m lightning_mtl.report runs/nyuv2_pcgrad runs/nyuv2_mgda \\
        --baselines runs/nyuv2_single_segmentation runs/nyuv2_single_depth runs/nyuv2_single_normal --out report/

A run folder is anything holding ``run_summary.json`` (written by
:class:`~lightning_mtl.callbacks.RunSummary` into every CLI run's folder, whatever the logger: CSV,
TensorBoard, W&B), a CSV logger's ``metrics.csv`` (``<save_dir>/<name>/version_<k>/``, older runs) or a
W&B run's ``wandb-summary.json``; a folder with several runs inside yields one row per run, labelled by
the shortest trailing path that tells it apart from the other rows. Runs without metrics of the stage
(failed or unfinished ones) are left out with a note. Of the logged keys ``<stage>/<task>/<metric>`` the report keeps the last value
(``--stage test`` by default, falling back to ``val`` for a run without test metrics); losses and the
``mean`` pseudo-task are left out.

Single-task runs given with ``--baselines`` provide ``B_tk`` for Delta m % (Maninis et al., CVPR 2019; see
:func:`lightning_mtl.multitask.delta_m.delta_m`; lower is better). Whether higher is better is known for
the metrics of this package's tasks (``acc``, ``f1``, ``miou``, ``pixel_acc``, ``within_*`` higher; errors
and angles lower); ``--higher NAME`` marks further metric names as higher-is-better. ``--normalised`` adds,
per run, each task's metric normalised by its baseline in % (``<task>/<metric>_norm``: value ÷ baseline
for a higher-is-better metric, baseline ÷ value for a lower-is-better one, so 100 is the baseline and
higher is better) and ``mean_norm``, their mean over tasks (as Delta m %, the metrics of a task averaged
first); with higher-is-better metrics only, ``mean_norm = 100 - Delta m %``. ``--metrics NAME ...``
keeps only those metric names (e.g. ``acc`` when runs log more).

Writes ``report.md``, ``report.csv`` and ``report.png`` (Delta m % per run, then one panel per metric: a
dot per run on an axis spanning the values, with the value beside it; the chart needs matplotlib and is
left out, with a warning, without it).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    folder: str = ""  # the run's folder, to tell apart runs whose labels coincide

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
        return _read_wandb_values(json.load(f))


def _read_summary(path: Path) -> dict[str, float]:
    """The final metrics of a ``run_summary.json`` (see :class:`~lightning_mtl.callbacks.RunSummary`)."""
    with open(path) as f:
        return _read_wandb_values(json.load(f).get("metrics", {}))


def _read_wandb_values(summary: dict[str, object]) -> dict[str, float]:
    return {k: float(v) for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


_SOURCES = ("run_summary.json", "metrics.csv", "wandb-summary.json")  # by preference, one per run folder


def find_runs(path: str | os.PathLike[str]) -> list[Run]:
    """Every run under ``path`` (the folder itself, or a metrics file), labelled by its folder."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"run folder {root} does not exist")
    found: dict[Path, Path] = {root.parent: root} if root.is_file() else {}
    for file in [] if root.is_file() else sorted(f for name in _SOURCES for f in root.rglob(name)):
        folder = file.parent
        if file.name == "wandb-summary.json" and folder.name == "files":  # wandb/<run>/files/wandb-summary.json
            folder = folder.parent
        if folder not in found or _SOURCES.index(file.name) < _SOURCES.index(found[folder].name):
            found[folder] = file
    runs = []
    for folder, file in sorted(found.items()):
        if file.name == "run_summary.json":
            values = _read_summary(file)
        elif file.suffix == ".csv":
            values = _read_csv(file)
        else:
            values = _read_wandb(file)
        try:
            relative = folder.relative_to(root)
            label = root.name if str(relative) == "." else f"{root.name}/{relative}"
        except ValueError:
            label = folder.name
        runs.append(Run(label, str(file), values, str(folder.resolve())))
    if not runs:
        raise FileNotFoundError(
            f"no run found under {root}: expected a run_summary.json (any run of `python -m lightning_mtl`), "
            "a CSV logger's metrics.csv or a W&B offline run (wandb/offline-run-*/files/wandb-summary.json)"
        )
    return runs


def _distinct_names(runs: Sequence[Run]) -> list[str]:
    """The runs' labels, each colliding one lengthened by its parent folders until all differ."""
    names = [run.name for run in runs]
    while True:
        seen: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            seen.setdefault(name, []).append(i)
        clashes = [i for group in seen.values() if len(group) > 1 for i in group]
        grown = False
        for i in clashes:
            parts = Path(runs[i].folder).parts if runs[i].folder else ()
            depth = len(Path(names[i]).parts)
            if len(parts) > depth:
                names[i] = str(Path(*parts[len(parts) - depth - 1 :]))
                grown = True
        if not grown:
            return names


def _baseline_values(baselines: Sequence[Run], stage: str) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for run in baselines:
        for task, metrics in run.task_metrics(run.stage(stage)).items():
            for metric, value in metrics.items():
                if metric in out.get(task, {}) and out[task][metric] != value:
                    raise ValueError(f"two baseline runs give {task}/{metric}; pass one single-task run per task")
                out.setdefault(task, {})[metric] = value
    return out


def _normalised(
    metrics: dict[str, dict[str, float]], base: dict[str, dict[str, float]], directions: dict[str, dict[str, bool]]
) -> dict[str, float]:
    """``{task/metric_norm: %, ..., mean_norm: %}``: each value over its baseline (inverted where lower is
    better), 100 = the baseline; the mean averages a task's metrics first, then the tasks."""
    out: dict[str, float] = {}
    per_task = []
    for task, values in base.items():
        ratios = []
        for metric, b in values.items():
            m = metrics[task][metric]
            ratio = m / b if directions[task][metric] else b / m
            out[f"{task}/{metric}_norm"] = 100.0 * ratio
            ratios.append(100.0 * ratio)
        per_task.append(sum(ratios) / len(ratios))
    out["mean_norm"] = sum(per_task) / len(per_task)
    return out


def build_rows(
    runs: Sequence[Run],
    baselines: Sequence[Run] = (),
    stage: str = "test",
    extra_higher: Iterable[str] = (),
    normalised: bool = False,
    metrics: Iterable[str] | None = None,
) -> tuple[list[str], list[dict[str, object]]]:
    """The table: column names (``task/metric``..., with ``normalised`` the ``task/metric_norm`` and
    ``mean_norm``, then ``delta_m``) and one row per run (baselines first); ``metrics`` keeps only those
    metric names."""
    extra = set(extra_higher)
    kept = None if metrics is None else set(metrics)
    if normalised and not baselines:
        raise ValueError("normalised values divide by the baselines: give --baselines (one single-task run per task)")
    base = _baseline_values(baselines, stage)
    if kept is not None:
        base = {t: {m: v for m, v in ms.items() if m in kept} for t, ms in base.items()}
    norm_columns: list[str] = []
    rows: list[dict[str, object]] = []
    columns: list[str] = []
    names = dict(zip(map(id, [*baselines, *runs]), _distinct_names([*baselines, *runs])))
    for kind, group in (("single-task", baselines), ("multi-task", runs)):
        for run in group:
            used = run.stage(stage)
            metrics = run.task_metrics(used)
            if kept is not None:
                metrics = {t: {m: v for m, v in ms.items() if m in kept} for t, ms in metrics.items()}
                metrics = {t: ms for t, ms in metrics.items() if ms}
            row: dict[str, object] = {"run": names[id(run)], "kind": kind, "stage": used}
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
                    if normalised:
                        ratios = _normalised(metrics, shared, directions)
                        row.update(ratios)
                        norm_columns += [c for c in ratios if c not in norm_columns]
            rows.append(row)
    columns += [c for c in norm_columns if c != "mean_norm"] + (["mean_norm"] if norm_columns else [])
    if base and any("delta_m" in r for r in rows):
        columns.append("delta_m")
    return columns, rows


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4f}"
    return "" if value is None else str(value)


def write_report(columns: list[str], rows: list[dict[str, object]], out: str | os.PathLike[str]) -> dict[str, Path]:
    """Write ``report.md``, ``report.csv`` and ``report.png`` into ``out``; returns their paths (no ``png``
    without matplotlib)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    header = ["run", "kind", "stage", *columns]
    paths = {"md": out / "report.md", "csv": out / "report.csv", "png": out / "report.png"}
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for row in rows:
            writer.writerow([row.get(c, "") for c in header])
    titles = [{"delta_m": "Delta m % (lower is better)", "mean_norm": "mean normalised %"}.get(c, c) for c in header]
    lines = ["| " + " | ".join(titles) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(row.get(c)) for c in header) + " |" for row in rows]
    paths["md"].write_text("\n".join(lines) + "\n")
    figure = _figure(columns, rows)
    if figure is None:
        del paths["png"]
    else:
        figure.savefig(paths["png"], dpi=110)
    return paths


_SINGLE, _MULTI, _BETTER, _WORSE = "#9aa5b1", "#3b7dd8", "#2e9e5b", "#d0473c"


def _span(values: Sequence[float], include: float | None = None) -> tuple[float, float]:
    """An axis range around ``values`` (and ``include``) with room for the value labels: the differences
    between runs, not the distance from zero, fill the panel."""
    low, high = min(values), max(values)
    if include is not None:
        low, high = min(low, include), max(high, include)
    pad = (high - low) * 0.15 or max(abs(high) * 0.05, 1e-3)
    return low - pad, high + pad * 2.5  # more room on the right, where the labels go


def _figure(columns: list[str], rows: list[dict[str, object]]) -> Any:  # a matplotlib Figure, or None
    """The chart: one panel per column, a dot per run with its value, or ``None`` without matplotlib."""
    try:
        import matplotlib  # noqa: F401  (first: an absent package fails here, not halfway through the drawing)
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
    except ImportError:
        warnings.warn(
            'the report\'s chart needs matplotlib (pip install "lightning-mtl[plots]"); report.png is not written',
            stacklevel=3,
        )
        return None
    first = [c for c in ("delta_m", "mean_norm") if c in columns]  # the summaries lead the chart
    panels = first + [c for c in columns if c not in first][: 12 - len(first)]
    cols = min(3, max(1, len(panels)))
    nrows = math.ceil(len(panels) / cols) or 1
    height = max(2.4, 0.8 + 0.32 * len(rows))
    fig = Figure(figsize=(5.2 * cols, height * nrows))
    axes = fig.subplots(nrows, cols, squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, column in zip(axes.flat, panels):
        shown = [r for r in rows if isinstance(r.get(column), float) and not math.isnan(r[column])]  # type: ignore[arg-type]
        if not shown:
            ax.axis("off")
            continue
        names = [str(r["run"]) for r in shown]
        values = [float(r[column]) for r in shown]  # type: ignore[arg-type]
        y = list(range(len(values)))[::-1]  # first row on top, as in the table
        if column == "delta_m":
            colors = [_BETTER if v < 0 else _WORSE for v in values]
            handles = [("better than single-task (< 0)", _BETTER), ("worse than single-task (> 0)", _WORSE)]
            ax.axvline(0.0, color="black", linewidth=0.8)
            ax.set_xlim(*_span(values, include=0.0))
            ax.set_title("Delta m % (lower is better)", fontsize=9)
            ax.set_xlabel("Delta m % vs single-task runs", fontsize=8)
        else:
            colors = [_SINGLE if r["kind"] == "single-task" else _MULTI for r in shown]
            handles = [("single-task run", _SINGLE), ("multi-task run", _MULTI)]
            ax.set_xlim(*_span(values))
            ax.set_title(column, fontsize=9)
            metric = column.rsplit("/", 1)[-1]
            direction = {True: " (higher is better)", False: " (lower is better)", None: ""}[_direction(metric)]
            ax.set_xlabel(f"{column}{direction}", fontsize=8)
        ax.hlines(y, ax.get_xlim()[0], values, color="#d9dde2", linewidth=1.0, zorder=1)
        ax.scatter(values, y, color=colors, s=36, zorder=2)
        for value, row in zip(values, y):
            ax.annotate(_fmt(value), (value, row), xytext=(5, 0), textcoords="offset points", va="center", fontsize=7)
        ax.set_yticks(y, names, fontsize=7)
        ax.set_ylim(-0.6, len(values) - 0.4)
        ax.set_ylabel("run", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(axis="x", color="#eeeeee", linewidth=0.6)
        ax.legend(
            [Line2D([], [], marker="o", linestyle="", color=c) for _, c in handles],
            [label for label, _ in handles],
            fontsize=6,
            loc="best",
        )
    fig.tight_layout()
    return fig


def _direction(metric: str) -> bool | None:
    if metric.endswith("_norm"):  # normalised by the baseline, inverted where lower is better
        return True
    try:
        return higher_is_better(metric)
    except ValueError:
        return None


def main(argv: Sequence[str] | None = None, prog: str = "python -m lightning_mtl report") -> dict[str, Path]:
    """``report RUN ... --out DIR``: print the Markdown table and write the files; returns their paths."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Per-task metrics and Delta m % of runs (folders of `python -m lightning_mtl` runs with any "
        "logger, CSV logger or W&B offline runs): writes report.md, report.csv and report.png.",
    )
    parser.add_argument("runs", nargs="+", help="run folders (multi-task runs)")
    parser.add_argument("--baselines", nargs="*", default=[], help="single-task run folders for Delta m %%")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--stage", choices=("test", "val"), default="test", help="which logged metrics to report")
    parser.add_argument("--higher", nargs="*", default=[], help="further metric names where higher is better")
    parser.add_argument("--normalised", action="store_true",
                        help="add each task's metric in %% of its baseline and their mean (needs --baselines)")  # fmt: skip
    parser.add_argument("--metrics", nargs="+", default=None, help="report only these metric names (e.g. acc)")
    args = parser.parse_args(argv)
    if args.normalised and not args.baselines:
        parser.error("--normalised divides by the baselines: give --baselines (one single-task run per task)")
    runs = _with_metrics([run for path in args.runs for run in find_runs(path)], args.stage)
    baselines = _with_metrics([run for path in args.baselines for run in find_runs(path)], args.stage)
    if not runs:
        raise SystemExit(f"no run under {' '.join(args.runs)} has {args.stage} or val metrics to report")
    columns, rows = build_rows(runs, baselines, stage=args.stage, extra_higher=args.higher,
                               normalised=args.normalised, metrics=args.metrics)  # fmt: skip
    paths = write_report(columns, rows, args.out)
    print(paths["md"].read_text(), end="")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return paths


def _with_metrics(runs: list[Run], stage: str) -> list[Run]:
    """The runs with task metrics for ``stage`` (or the fallback stage); a note on stderr for each other."""
    kept = []
    for run in runs:
        if run.task_metrics(run.stage(stage)):
            kept.append(run)
        else:
            print(f"skipped {run.name}: no {stage} or val metrics in {run.source} (a failed or unfinished run?)",
                  file=sys.stderr)  # fmt: skip
    return kept


if __name__ == "__main__":
    main()
