"""Train the quickstart model under each Lightning precision and compare accuracy and step time.

Checks that ``MultiTaskModule`` trains correctly under ``32-true``, ``bf16-mixed`` and ``16-mixed``
(loss scaling by Lightning's precision plugin) on the same data, seed and schedule, and prints the
test accuracy of both tasks and the time per epoch of each, relative to ``32-true``.

    python benchmarks/precision.py --quick          # CPU: 32-true and bf16-mixed, one epoch
    python benchmarks/precision.py --epochs 4       # on a GPU: all three precisions
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import lightning.pytorch as pl
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _timing import emit

from lightning_mtl import ClassificationTask, DigitsCNN, MultiDigits, MultiTaskModule


def run(precision: str, epochs: int, accelerator: str, num_train: int, aggregator: str, mode: str) -> dict[str, float]:
    pl.seed_everything(0, verbose=False)
    model = MultiTaskModule(
        encoder=DigitsCNN(), tasks={"left": ClassificationTask(10), "right": ClassificationTask(10)},
        optimizer=lambda p: torch.optim.Adam(p, lr=2e-3), aggregator=aggregator, gradient_mode=mode,
    )  # fmt: skip
    data = MultiDigits(num_train=num_train, batch_size=256)
    trainer = pl.Trainer(
        accelerator=accelerator, devices=1, precision=precision, max_epochs=epochs, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    seconds = (time.perf_counter() - start) / epochs
    metrics = trainer.test(model, datamodule=data, verbose=False)[0]
    return {"left": metrics["test/left/acc"], "right": metrics["test/right/acc"], "s_per_epoch": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--num-train", type=int, default=20000)
    parser.add_argument("--aggregator", default="ls", help="a registered aggregator name, e.g. nashmtl")
    parser.add_argument("--gradient-mode", default="parameter", choices=["parameter", "representation"])
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    precisions = ["32-true", "bf16-mixed"] + (["16-mixed"] if accelerator == "gpu" else [])
    if args.quick:
        args.epochs, args.num_train = 1, 512
    results = {
        p: run(p, args.epochs, accelerator, args.num_train, args.aggregator, args.gradient_mode) for p in precisions
    }
    base = results["32-true"]["s_per_epoch"]
    print(
        f"{accelerator}, {args.aggregator} ({args.gradient_mode}), {args.epochs} epochs of {args.num_train} pairs, batch 256"
    )
    for p, r in results.items():
        print(f"{p:11s} test acc left {r['left']:.4f} right {r['right']:.4f}  "
              f"{r['s_per_epoch']:.2f} s/epoch ({r['s_per_epoch'] / base:.2f}x of 32-true)")  # fmt: skip
    emit({"benchmark": "precision", "device": accelerator, "aggregator": args.aggregator, "mode": args.gradient_mode,
          "epochs": args.epochs, "results": results})  # fmt: skip


if __name__ == "__main__":
    main()
