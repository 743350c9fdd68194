"""ZIP-FIT's recipe table: target loss of the tiny byte-level LM trained on the top K against a random K.

Runs ``configs/selection/zipfit.yaml`` (top K) and the same with ``configs/selection/zipfit_random.yaml``
(a random K of the same size) through the command line for each seed, then prints a Markdown table of the
validation (target) loss, in nats per byte, at the last epoch and at the best epoch, and the share of
code among the kept examples. Offline; the score cache under ``runs/zipfit_cache`` makes reruns skip the
scoring.

    python examples/zipfit_recipe.py                  # 3 seeds, the docs table
    python examples/zipfit_recipe.py --max-epochs 2   # a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import time

from lightning_mtl.cli import main as cli_main

RECIPE = "configs/selection/zipfit.yaml"
RANDOM = "configs/selection/zipfit_random.yaml"


def run(strategy: str, seed: int, max_epochs: int) -> dict[str, float]:
    """One fit through the CLI; its last and best target loss and the share of code it trained on."""
    configs = ["--config", RECIPE] + (["--config", RANDOM] if strategy == "random" else [])
    cli = cli_main(["fit", *configs, f"--seed_everything={seed}", f"--data.init_args.seed={seed}",
                    f"--trainer.max_epochs={max_epochs}", "--trainer.enable_progress_bar=false",
                    "--trainer.enable_model_summary=false"])  # fmt: skip
    data = cli.datamodule
    kinds = [data.datamodule.train_kinds[i] for i in data.selected]
    best = cli.trainer.checkpoint_callback.best_model_score  # type: ignore[union-attr]  # the recipe has one
    return {"last": float(cli.trainer.callback_metrics["val/loss"]), "best": float(best),
            "code": kinds.count("code") / len(kinds)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max-epochs", type=int, default=20)
    args = parser.parse_args()
    start = time.perf_counter()
    rows = {(s, seed): run(s, seed, args.max_epochs) for s in ("top", "random") for seed in args.seeds}
    print("\n| training set (K = 150 of 600) | seed | code share | target loss, last epoch | target loss, best epoch |")
    print("| --- | --- | --- | --- | --- |")
    for (strategy, seed), row in rows.items():
        name = "ZIP-FIT top K" if strategy == "top" else "random K"
        print(f"| {name} | {seed} | {row['code']:.2f} | {row['last']:.4f} | {row['best']:.4f} |")
    for strategy in ("top", "random"):
        last = [rows[strategy, seed]["last"] for seed in args.seeds]
        best = [rows[strategy, seed]["best"] for seed in args.seeds]
        name = "ZIP-FIT top K" if strategy == "top" else "random K"
        print(f"| **{name}, mean** | | | {statistics.mean(last):.4f} | {statistics.mean(best):.4f} |")
    print(f"\n{len(rows)} runs in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
