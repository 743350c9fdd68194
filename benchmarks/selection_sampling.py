"""Multi-task samplers' overhead on a data-loading-bound epoch, and the Lasso source-sampling curve on digits.

``--part overhead`` (the default): one epoch of loading over the same three task data sets (items cost
a bilinear upscale each, so loading dominates) through a plain ``DataLoader`` (shuffled, default
collate) and through :class:`~lightning_mtl.selection.MultiTaskSampling` (proportional schedule: the
same items once each, single-task batches with the other tasks' labels marked missing) and the
:class:`~lightning_mtl.selection.SourceBudgetSampler`; no model. The sides alternate for
``--repeats`` rounds; a side's time is the median over rounds. Target: ratio <= 1.02.

``--part lasso``: the embedded benchmark of ``docs/selection_sampling.md``: sources = 5 corruptions x
4 digit-vs-rest tasks of the sklearn digits, target ``invert_3`` with 40 labels (the source
``invert_3`` is the planted relevant one); a MultiTaskModule learns the representation for 5 epochs on
``total`` source samples per epoch, split uniformly or by ``ActiveSourceSelection`` (``nu2``,
``nu1``); the target accuracy is a logistic regression on the 40 labelled target images' features,
measured on the rest of the target pool. Seeds 0, 1, 2; a few minutes on 2 CPU cores.

    python benchmarks/selection_sampling.py --quick              # overhead, under a minute
    python benchmarks/selection_sampling.py --part lasso         # the docs table
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import ConcatDataset, DataLoader, Dataset

sys.path.insert(0, os.path.dirname(__file__))
from _timing import emit

from lightning_mtl import ClassificationTask, MultiTaskModule
from lightning_mtl.selection import (
    ActiveSourceSelection,
    DigitsMLP,
    DigitsSources,
    MultiTaskSampling,
    SourceBudgetSampler,
)


class _Upscaled(Dataset):
    """``(image upscaled to 48 x 48, label)``: the per-item work of a decoding / augmenting data set."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x, self.y = torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 2, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return F.interpolate(self.x[i : i + 1], size=48, mode="bilinear", align_corners=False)[0], self.y[i]


def _epoch_seconds(loader) -> float:
    start = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - start


def overhead(args) -> dict:
    sizes = [int(args.items * f) for f in (0.6, 0.3, 0.1)]
    parts = [_Upscaled(n, seed) for seed, n in enumerate(sizes)]
    plain = DataLoader(ConcatDataset(parts), batch_size=args.batch_size, shuffle=True)
    sampling = MultiTaskSampling(dict(zip("abc", parts)), batch_size=args.batch_size, schedule="proportional")
    sampling.setup("fit")
    ours = sampling.train_dataloader()
    budget = SourceBudgetSampler(sizes, [sum(sizes) // 3] * 3, args.batch_size)
    budgets = DataLoader(ConcatDataset(parts), batch_sampler=budget)
    times: dict[str, list[float]] = {"plain": [], "multitask": [], "budget": []}
    for epoch in range(args.repeats):  # alternate, so drifts of the machine hit all sides alike
        ours.batch_sampler.set_epoch(epoch)  # type: ignore[union-attr]
        budget.set_epoch(epoch)
        times["plain"].append(_epoch_seconds(plain))
        times["multitask"].append(_epoch_seconds(ours))
        times["budget"].append(_epoch_seconds(budgets))
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = {k: med[k] / med["plain"] for k in ("multitask", "budget")}
    print(
        f"{sum(sizes)} items, batch {args.batch_size}, {args.repeats} rounds, torch threads {torch.get_num_threads()}"
    )
    for k, v in med.items():
        print(
            f"{k:10s} {1000 * v:9.1f} ms/epoch" + ("" if k == "plain" else f"   ratio {ratios[k]:.3f} (target <= 1.02)")
        )
    targets = {f"{k}_le_1.02": "met" if r <= 1.02 else "missed" for k, r in ratios.items()}
    print(f"targets: {targets}")
    return {"items": sum(sizes), "batch_size": args.batch_size, "plain_ms": round(1000 * med["plain"], 2),
            "multitask_ms": round(1000 * med["multitask"], 2), "budget_ms": round(1000 * med["budget"], 2),
            "multitask_ratio": round(ratios["multitask"], 4), "budget_ratio": round(ratios["budget"], 4),
            "target": 1.02, "targets": targets}  # fmt: skip


def lasso_run(strategy: str, total: int, seed: int, epochs: int) -> tuple[float, float]:
    """``(target accuracy, final budget share of the planted source)`` of one run."""
    from sklearn.linear_model import LogisticRegression

    pl.seed_everything(seed, verbose=False)
    dm = DigitsSources(total_budget=total, seed=seed)
    encoder = DigitsMLP()
    model = MultiTaskModule(encoder, {name: ClassificationTask(2) for name in dm.source_names}, feature_dim=32,
                            optimizer=lambda p: torch.optim.Adam(p, lr=3e-3))  # fmt: skip
    callbacks = [] if strategy == "uniform" else [ActiveSourceSelection(strategy=strategy)]  # type: ignore[arg-type]
    trainer = pl.Trainer(accelerator="cpu", max_epochs=epochs, callbacks=callbacks, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(model, datamodule=dm)
    encoder.eval()
    with torch.no_grad():
        (x, y), (xt, yt) = dm.relevance_data()[1], dm.target_test()
        head = LogisticRegression(max_iter=5000).fit(encoder(x).numpy(), y.numpy())
        accuracy = float(head.score(encoder(xt).numpy(), yt.numpy()))
    share = float(dm.budgets[dm.source_names.index("invert_3")]) / total
    return accuracy, share


def lasso_curve(args) -> dict:
    totals, seeds, epochs = (args.totals, args.seeds, args.epochs)
    rows: dict[str, dict[int, list[tuple[float, float]]]] = {}
    for strategy in ("uniform", "nu2", "nu1"):
        rows[strategy] = {t: [lasso_run(strategy, t, s, epochs) for s in seeds] for t in totals}
    print(f"target invert_3 (40 labels), 20 sources, {epochs} epochs, seeds {list(seeds)}: target accuracy "
          "(mean ± std) and the last budget share of the planted source")  # fmt: skip
    print("| source samples | " + " | ".join(rows) + " |")
    print("|---|" + "---|" * len(rows))
    figures: dict[str, dict[str, float]] = {}
    for t in totals:
        cells = []
        for strategy, by_total in rows.items():
            acc = [a for a, _ in by_total[t]]
            share = statistics.mean(s for _, s in by_total[t])
            cells.append(f"{100 * statistics.mean(acc):.1f} ± {100 * statistics.pstdev(acc):.1f} (share {share:.2f})")
            figures[f"{strategy}_{t * epochs}"] = {"acc": round(statistics.mean(acc), 4), "share": round(share, 3)}
        print(f"| {t * epochs} | " + " | ".join(cells) + " |")
    nu1_share = float(np.mean([s for t in totals for _, s in rows["nu1"][t]]))
    targets = {"nu1_planted_share_gt_0.5": "met" if nu1_share > 0.5 else "missed"}
    print(f"targets: {targets}")
    return {"lasso": figures, "nu1_planted_share": round(nu1_share, 3), "targets_lasso": targets}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short run (under a minute on a 2-core CPU)")
    parser.add_argument("--part", choices=("overhead", "lasso", "all"), default="overhead")
    parser.add_argument("--items", type=int, default=12000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--totals", type=int, nargs="+", default=[200, 500, 1000])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    if args.quick:
        args.items, args.repeats, args.totals, args.seeds = 4000, 3, [500], [0]
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    figures: dict = {"benchmark": "selection_sampling"}
    if args.part in ("overhead", "all"):
        figures |= overhead(args)
    if args.part in ("lasso", "all"):
        figures |= lasso_curve(args)
    emit(figures)


if __name__ == "__main__":
    main()
