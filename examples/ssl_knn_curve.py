"""Plot the online kNN accuracy (and the online linear probe's) of a self-supervised run from its CSV log.

    pip install matplotlib      # not a dependency of lightning-mtl
    python -m lightning_mtl fit --config configs/ssl/data/digits.yaml
    python examples/ssl_knn_curve.py runs/ssl_digits/mixed_barlow_twins/version_0/metrics.csv --out docs/ssl_knn_curve.png

Several CSV files draw several curves (e.g. Barlow Twins against Mixed Barlow Twins); ``--label`` names them.
The accuracies per epoch are also printed as a table.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path


def read_curve(path: Path, key: str) -> list[tuple[int, float]]:
    """``(epoch, value)`` of every row of a Lightning ``metrics.csv`` that has ``key`` (1-based epochs)."""
    with path.open(newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get(key) not in (None, "")]
    return [(int(row["epoch"]) + 1, float(row[key])) for row in rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", nargs="+", type=Path, help="metrics.csv of the run(s)")
    parser.add_argument("--label", nargs="*", default=None, help="one legend label per CSV file")
    parser.add_argument("--out", type=Path, default=Path("docs/ssl_knn_curve.png"))
    parser.add_argument("--knn-key", default="val/knn/acc")
    parser.add_argument("--probe-key", default="val/probe/acc", help="'' leaves the probe out")
    parser.add_argument("--title", default="Online evaluation on the validation split (sklearn digits)")
    args = parser.parse_args(argv)
    labels = args.label or [p.parent.parent.name for p in args.csv]
    if len(labels) != len(args.csv):
        parser.error("give one --label per CSV file")

    curves = []
    for path, label in zip(args.csv, labels):
        knn = read_curve(path, args.knn_key)
        if not knn:
            parser.error(f"{path} has no '{args.knn_key}' column values: was the KNNMonitor callback in the run?")
        probe = read_curve(path, args.probe_key) if args.probe_key else []
        curves.append((label, knn, probe))
        print(f"{label}: epoch  kNN acc" + ("  probe acc" if probe else ""))
        probe_at = dict(probe)
        for epoch, value in knn:
            extra = f"  {probe_at[epoch]:.4f}" if epoch in probe_at else ""
            print(f"{label}: {epoch:5d}  {value:.4f}{extra}")

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("This example plots with matplotlib, which lightning-mtl does not install: pip install matplotlib")
        return 1
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for index, (label, knn, probe) in enumerate(curves):
        colour = f"C{index}"
        ax.plot(*zip(*knn), marker="o", markersize=3, color=colour, label=f"{label}: weighted kNN")
        if probe:
            ax.plot(*zip(*probe), linestyle="--", color=colour, alpha=0.6, label=f"{label}: online linear probe")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy")
    ax.set_title(args.title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
