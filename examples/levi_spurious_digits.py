"""LEVI's spurious-feature table: linear probe vs. full fine-tuning vs. LEVI on digits with a planted pixel.

1. "Pre-training": a DigitsCNN learns the clean digits rotated by 90 degrees (another domain than the
   downstream task; plain PyTorch, the training split, no planted pixel) and is saved to
   ``runs/finetuning/digits_cnn_rot90.pt`` (skipped when the file exists).
2. Fine-tuning through the command line on :class:`~lightning_mtl.datamodules.SpuriousDigits` (upright
   digits; in training and validation a border pixel names the label for 90 % of the images):
   ``configs/finetuning/levi.yaml`` and its two baselines ``levi_linear_probe.yaml`` / ``levi_full_finetune.yaml``.
3. Each fitted model is tested on the test split with the pixel naming a random class and with no pixel
   (clean); the Markdown table gives mean and standard deviation over the seeds, and the last line is one
   JSON object with every figure.

    python examples/levi_spurious_digits.py                   # 3 seeds, the docs table
    python examples/levi_spurious_digits.py --pretrain-only   # only the backbone file the recipe reads
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lightning_mtl.architectures import DigitsCNN
from lightning_mtl.cli import main as cli_main
from lightning_mtl.datamodules import Digits, SpuriousDigits

WEIGHTS = Path("runs/finetuning/digits_cnn_rot90.pt")
RECIPE = "configs/finetuning/levi.yaml"
METHODS = {"linear probe": ["configs/finetuning/levi_linear_probe.yaml"],
           "full fine-tuning": ["configs/finetuning/levi_full_finetune.yaml"], "LEVI": []}  # fmt: skip


def pretrain(epochs: int = 15, seed: int = 0) -> None:
    """Train a DigitsCNN and a linear head on the rotated clean training digits; save the DigitsCNN."""
    torch.manual_seed(seed)
    data = Digits(as_dict=False, seed=seed)
    data.setup("fit")
    x, y = data.train_set.inputs, data.train_set.targets  # type: ignore[union-attr]
    x = torch.rot90(x, 1, dims=(-2, -1))
    backbone = DigitsCNN(channels=(32, 64), out_features=128)
    model = nn.Sequential(backbone, nn.Linear(128, 10))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(64):
            optimizer.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
    model.eval()
    xv = torch.rot90(data.val_set.inputs, 1, dims=(-2, -1))  # type: ignore[union-attr]
    with torch.no_grad():
        accuracy = (model(xv).argmax(1) == data.val_set.targets).float().mean().item()  # type: ignore[union-attr]
    print(f"pre-training (rotated digits): val accuracy {accuracy:.3f}")
    WEIGHTS.parent.mkdir(parents=True, exist_ok=True)
    torch.save(backbone.state_dict(), WEIGHTS)


def run(method: str, seed: int, max_epochs: int) -> dict[str, float]:
    configs = ["--config", RECIPE] + [a for c in METHODS[method] for a in ("--config", c)]
    cli = cli_main(["fit", *configs, f"--seed_everything={seed}", f"--data.init_args.seed={seed}",
                    f"--trainer.max_epochs={max_epochs}", "--trainer.enable_progress_bar=false",
                    "--trainer.enable_model_summary=false", "--trainer.logger=false"])  # fmt: skip
    out = {"val": float(cli.trainer.callback_metrics["val/accuracy"])}
    for mode in ("random", "clean"):
        data = SpuriousDigits(correlation=0.9, test_mode=mode, batch_size=256, seed=seed)
        result = cli.trainer.test(cli.model, datamodule=data, verbose=False)
        out[mode] = float(result[0]["test/accuracy"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max-epochs", type=int, default=30)
    parser.add_argument("--pretrain-only", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if not WEIGHTS.exists():
        pretrain()
    if args.pretrain_only:
        return
    results: dict[str, list[dict[str, float]]] = {m: [] for m in METHODS}
    for seed in args.seeds:
        for method in METHODS:
            results[method].append(run(method, seed, args.max_epochs))
            print(method, seed, results[method][-1], flush=True)

    def cell(values: list[float]) -> str:
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{100 * statistics.mean(values):.1f} ± {100 * spread:.1f}"

    print("\n| method | val (pixel names the label, 90 %) | test, pixel random | test, clean |")
    print("|---|---|---|---|")
    for method, rows in results.items():
        print(f"| {method} | " + " | ".join(cell([r[k] for r in rows]) for k in ("val", "random", "clean")) + " |")
    print(json.dumps({"benchmark": "levi_spurious_digits", "seeds": args.seeds, "max_epochs": args.max_epochs,
                      "results": results}))  # fmt: skip


if __name__ == "__main__":
    main()
