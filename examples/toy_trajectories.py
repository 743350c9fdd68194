"""Trajectories of every registered method on the CAGrad / Nash-MTL two-objective toy problem.

One panel per method: the contours of the mean loss ``(L1 + L2) / 2``, the Pareto set (grey arc),
the start points (black dots) and one trajectory per start point (its end marked by a cross),
with the largest final distance to the Pareto set in the panel title. The problem, its Pareto
set and the optimiser are in :mod:`lightning_mtl.multitask.toy`.

    pip install matplotlib      # not a dependency of lightning-mtl
    python examples/toy_trajectories.py --out docs/toy_trajectories.png
    python examples/toy_trajectories.py --scale 0.1 --methods mgda nashmtl famo   # Nash-MTL's variant
    python examples/toy_trajectories.py --protocol paper --steps 35000 --methods pcgrad   # hours for all

By default the short protocol of the tests runs (``toy.QUICK_PROTOCOL``: 150 Adam steps, lr 0.8
decayed to 1e-3, betas (0.5, 0.9)); its large steps jump over the narrow logarithmic valleys
above the axis, where in the papers' protocol (``--protocol paper``: lr 1e-3, betas (0.9, 0.999),
35,000 to 100,000 steps) some methods stall. The final distances are printed as a table.
"""

from __future__ import annotations

import argparse
import inspect
import io
import math
import sys
import time
from pathlib import Path

import torch

from lightning_mtl.aggregators import create_aggregator, get_aggregator_class, list_aggregators
from lightning_mtl.multitask import toy

# Settings of the official toy scripts where they differ from the registry defaults.
TOY_SETTINGS = {
    "cagrad": {"c": 0.5},  # CAGrad's toy.py (Nash-MTL's toy uses 0.4, the default here)
    "famo": {"weight_decay": 0.0},  # FAMO's experiments/toy/run.sh: gamma = 0
}
TOY_LOW_BOUND_NOTE = "loss weightings see L_i - L_i^min > 0 (FAMO's toy shift), same gradients"
START_COLOURS = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink"]


def build(name: str):
    kwargs = dict(TOY_SETTINGS.get(name, {}))
    if "seed" in inspect.signature(get_aggregator_class(name)).parameters:
        kwargs["seed"] = 0  # random task orders / dropout / weights: reproducible figure
    return create_aggregator(name, **kwargs)


def save_png(fig, path: Path, dpi: int) -> None:
    """Save with a 256-colour palette when Pillow is there (matplotlib depends on it): ~3x smaller."""
    try:
        from PIL import Image
    except ImportError:
        fig.savefig(path, dpi=dpi)
        return
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    buffer.seek(0)
    Image.open(buffer).convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(path, optimize=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/toy_trajectories.png"), help="PNG path")
    parser.add_argument("--methods", nargs="*", default=None, help="registered names (default: all)")
    parser.add_argument("--protocol", choices=["quick", "paper"], default="quick")
    parser.add_argument("--steps", type=int, default=None, help="default: 150 (quick), 35000 (paper)")
    parser.add_argument("--lr", type=float, default=None, help="default: 0.8 -> 1e-3 (quick), 1e-3 (paper)")
    parser.add_argument("--scale", type=float, default=1.0, help="factor on L1: 1 (CAGrad), 0.1 (Nash-MTL/FAMO)")
    parser.add_argument("--dpi", type=int, default=72)
    return parser.parse_args(argv)


def protocol(args: argparse.Namespace) -> dict:
    if args.protocol == "quick":
        run = dict(toy.QUICK_PROTOCOL)
    else:
        run = {"steps": toy.PAPER_STEPS["nashmtl"], "lr": toy.PAPER_LR, "lr_final": None, "betas": (0.9, 0.999)}
    if args.steps is not None:
        run["steps"] = args.steps
    if args.lr is not None:
        run["lr"] = args.lr
    return run


def describe(run: dict, scale: float) -> str:
    lr = f"lr {run['lr']:g}" + (f" -> {run['lr_final']:g} (cosine)" if run.get("lr_final") else "")
    problem = "CAGrad's toy (scale 1)" if scale == 1.0 else f"L1 x {scale:g} (Nash-MTL/FAMO toy)"
    return f"{problem}; Adam {lr}, betas {run['betas']}, {run['steps']} steps; {TOY_LOW_BOUND_NOTE}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("This example plots with matplotlib, which lightning-mtl does not install: pip install matplotlib")
        return 1

    torch.set_num_threads(1)  # 2 x 2 problems: threads only add synchronisation
    names = args.methods or list_aggregators()
    run = protocol(args)
    starts = torch.tensor(toy.ALL_START_POINTS, dtype=torch.float64)

    trajectories: dict[str, torch.Tensor] = {}
    for name in names:
        began = time.perf_counter()
        trajectories[name] = toy.optimize(build(name), starts, scale=args.scale, **run)
        print(f"{name:12s} {time.perf_counter() - began:6.1f} s", file=sys.stderr, flush=True)

    # table of final distances to the Pareto set
    header = "method        " + " ".join(f"({x:g},{y:g})".rjust(12) for x, y in toy.ALL_START_POINTS)
    print(describe(run, args.scale))
    print(header)
    for name, traj in trajectories.items():
        dist = toy.distance_to_pareto_set(traj[-1])
        print(f"{name:13s} " + " ".join(f"{d:12.4f}" for d in dist.tolist()))

    # the figure
    lim = 11.0
    grid = torch.linspace(-lim, lim, 241, dtype=torch.float64)
    xx, yy = torch.meshgrid(grid, grid, indexing="xy")
    mean_loss = toy.losses(torch.stack([xx, yy], -1), args.scale).mean(-1)
    curve = toy.pareto_set(201)
    cols = min(5, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.1 * cols, 3.1 * rows + 0.5), squeeze=False)
    # levels at quantiles of the mean loss: the valleys above the axis would hog evenly spaced ones
    levels = torch.quantile(mean_loss.flatten(), torch.linspace(0.0, 1.0, 14, dtype=torch.float64)).unique().tolist()
    for ax, name in zip(axes.flat, names):
        traj = trajectories[name]
        ax.contour(xx.numpy(), yy.numpy(), mean_loss.numpy(), levels=levels, cmap="viridis", linewidths=0.6, alpha=0.8)
        ax.plot(curve[:, 0].numpy(), curve[:, 1].numpy(), color="0.5", linewidth=4, alpha=0.6, zorder=2)
        for i in range(traj.shape[1]):
            path = traj[:, i].clamp(-lim, lim)
            ax.plot(path[:, 0].numpy(), path[:, 1].numpy(), color=START_COLOURS[i], linewidth=1.3, zorder=3)
            ax.plot(*path[-1].tolist(), marker="x", color=START_COLOURS[i], markersize=7, mew=2, zorder=5)
        ax.scatter(starts[:, 0].numpy(), starts[:, 1].numpy(), color="k", s=20, zorder=4)
        worst = toy.distance_to_pareto_set(traj[-1]).max().item()
        ax.set_title(f"{name}   (max dist {worst:.2g})", fontsize=10)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.tick_params(labelsize=7)
    spare = list(axes.flat)[len(names) :]
    for ax in spare:
        ax.axis("off")
    handles = [
        plt.Line2D([], [], color=START_COLOURS[i], marker="o", markerfacecolor="k", label=f"start ({x:g}, {y:g})")
        for i, (x, y) in enumerate(toy.ALL_START_POINTS)
    ]
    handles.append(plt.Line2D([], [], color="0.5", linewidth=4, alpha=0.6, label="Pareto set"))
    (spare[0] if spare else fig).legend(handles=handles, loc="center", fontsize=9, frameon=False)
    fig.suptitle(
        "Toy problem of CAGrad / Nash-MTL: contours of (L1 + L2) / 2, Pareto set (grey), starts (dots), ends (x); "
        "title: largest final distance to the Pareto set\n" + describe(run, args.scale),
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_png(fig, args.out, args.dpi)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
