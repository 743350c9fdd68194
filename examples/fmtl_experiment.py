"""F-MTL against its base aggregator on MultiDigits with a reduced training set, several seeds.

Flat minima should matter most when the training set is small, so each method trains on
``--num-train`` composed images (the default MultiDigits has 20,000) for a fixed number of epochs,
with and without F-MTL, from the same seeds; the test accuracy of the last epoch is reported (no
model selection on the test split). The data pools are the same for every run (data seed 0); the
seed changes the initialization and the batch order.

    python examples/fmtl_experiment.py                       # LS, PCGrad, CAGrad x 3 seeds, CPU
    python examples/fmtl_experiment.py --methods ls --seeds 0 --epochs 2   # a smoke run

Prints a markdown table (mean and standard deviation over the seeds of the mean test accuracy of
the two tasks) and, last, one JSON line with every run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import lightning.pytorch as pl
import torch

from lightning_mtl import ClassificationTask, DigitsCNN, MultiDigits, MultiTaskModule
from lightning_mtl.multitask.fmtl import FMTL


def run(method: str, seed: int, fmtl: bool, args: argparse.Namespace) -> dict:
    pl.seed_everything(seed, verbose=False)
    model = MultiTaskModule(
        encoder=DigitsCNN(),
        tasks={"left": ClassificationTask(10), "right": ClassificationTask(10)},
        aggregator=method,
        optimizer=lambda params: torch.optim.Adam(params, lr=args.lr),
        fmtl=FMTL(rho=args.rho, adaptive=args.adaptive, normalization=args.normalization) if fmtl else None,
    )
    data = MultiDigits(
        num_train=args.num_train, num_val=500, num_test=args.num_test, batch_size=args.batch_size, seed=0
    )
    trainer = pl.Trainer(
        max_epochs=args.epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    seconds = time.perf_counter() - start
    metrics = trainer.test(model, datamodule=data, verbose=False)[0]
    left, right = float(metrics["test/left/acc"]), float(metrics["test/right/acc"])
    return {"method": method, "fmtl": fmtl, "seed": seed, "left": left, "right": right,
            "mean": (left + right) / 2, "fit_seconds": round(seconds, 1)}  # fmt: skip


def summary(runs: list[dict], method: str, fmtl: bool) -> tuple[float, float]:
    values = [100 * r["mean"] for r in runs if r["method"] == method and r["fmtl"] == fmtl]
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["ls", "pcgrad", "cagrad"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--num-train", type=int, default=1000)
    parser.add_argument("--num-test", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--adaptive", action="store_true")
    parser.add_argument("--normalization", default="joint", choices=["joint", "separate"])
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    runs = []
    for method in args.methods:
        for seed in args.seeds:
            for fmtl in (False, True):
                runs.append(run(method, seed, fmtl, args))
                r = runs[-1]
                print(f"{method:8s} fmtl={fmtl!s:5s} seed={seed} left {100 * r['left']:.2f} right {100 * r['right']:.2f} "
                      f"({r['fit_seconds']} s)", flush=True)  # fmt: skip

    print(f"\nMultiDigits, {args.num_train} training images, {args.epochs} epochs, batch {args.batch_size}, "
          f"Adam lr {args.lr}; F-MTL rho {args.rho}, {'ASAM' if args.adaptive else 'SAM'} form, "
          f"{args.normalization} normalization; mean test accuracy of the two tasks (%), mean +- std over "
          f"seeds {args.seeds}\n")  # fmt: skip
    print("| method | base | F-MTL | difference |")
    print("|---|---|---|---|")
    for method in args.methods:
        (b, bs), (f, fs) = summary(runs, method, False), summary(runs, method, True)
        print(f"| {method} | {b:.2f} +- {bs:.2f} | {f:.2f} +- {fs:.2f} | {f - b:+.2f} |")
    print(json.dumps({"experiment": "fmtl_reduced_multidigits", "args": vars(args), "runs": runs}))


if __name__ == "__main__":
    main()
