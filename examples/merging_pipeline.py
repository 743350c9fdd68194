"""The DigitsTasks merging pipeline: pre-train, fine-tune T experts, merge by each method, one report.

Every step runs through the command line's entry point (``lightning_mtl.cli.main``, what
``python -m lightning_mtl ...`` calls) with the recipes of ``configs/merging/``:

1. ``fit pretrain.yaml``: theta_0, a DigitsCNN on the plain digits;
2. ``fit finetune.yaml + tasks/<task>.yaml``: one expert per task, tested after fit (the report's
   baselines: runs/merging/experts/<task>/run_summary.json);
3. ``runs/merging/base.ckpt`` is written here: theta_0 with every expert's head, the experts' validation
   accuracies as its baselines (so it logs val/delta_m = 100 - mean normalised accuracy), the data all
   tasks: the base the merge recipes read;
4. ``merge averaging.yaml / task_arithmetic.yaml / ties.yaml``: the training-free merges, lambda chosen on
   the validation split by ``trainer.validate`` over each recipe's grid (``search_coefficient``), each
   merged checkpoint then tested (``test --ckpt_path``), and theta_0 itself;
5. ``fit atlas.yaml`` at granularity ``task`` and ``block`` (coefficients learned on the validation split,
   as the official aTLAS code; tested after fit) and ``fit grafting.yaml`` once per task;
6. ``report``: per-task test accuracy, normalised accuracy (÷ the expert's) and the mean, Markdown + PNG in
   runs/merging/report/.

Grafting is not a merge (one grafted model per task): its row gathers the six grafted models' test
accuracies, listed for its localisation (the share of each task vector kept, the masks' IoU printed).

    python examples/merging_pipeline.py            # about 10 minutes on 2 idle CPU cores (58 under heavy load)
    python examples/merging_pipeline.py --reuse    # keep checkpoints that exist already
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_mtl.cli import main as cli
from lightning_mtl.merging import load_mask, mask_iou

TASKS = ["rotate90", "invert", "permute", "parity", "mod3", "hflip"]
ROOT = "runs/merging"
PRETRAIN = f"{ROOT}/pretrain/best.ckpt"
BASE = f"{ROOT}/base.ckpt"
TABLE = f"{ROOT}/table"  # one run folder (run_summary.json) per row of the report
QUIET = ["--trainer.enable_model_summary", "false"]


def expert_path(task: str) -> str:
    return f"{ROOT}/experts/{task}/best.ckpt"


def run(args: list[str], reuse: bool, output: str) -> None:
    """``fit ...`` unless ``output`` exists and ``reuse`` is set."""
    if reuse and os.path.exists(output):
        return
    if os.path.exists(output):
        os.remove(output)
    cli(["fit", *args, *QUIET])


def summary_metrics(folder: str) -> dict[str, float]:
    with open(Path(folder) / "run_summary.json") as f:
        summary: dict[str, Any] = json.load(f)
    return {**summary["metrics"], **summary.get("best", {})}


def table_logger(label: str) -> list[str]:
    """A CSV logger whose run folder is runs/merging/table/<label>/ (the report's row label)."""
    logger = {"class_path": "CSVLogger", "init_args": {"save_dir": TABLE, "name": label, "version": ""}}
    return ["--trainer.logger", json.dumps(logger)]


def write_base(expert_val: dict[str, float]) -> None:
    """theta_0's encoder with every expert's head, as a CLI checkpoint of a MultiTaskModule over all tasks."""
    pretrain = torch.load(PRETRAIN, map_location="cpu", weights_only=True)
    experts = {t: torch.load(expert_path(t), map_location="cpu", weights_only=True) for t in TASKS}
    first = experts[TASKS[0]]
    state = {k: v for k, v in pretrain["state_dict"].items() if not k.startswith("heads.")}
    for task, checkpoint in experts.items():
        state.update({k: v for k, v in checkpoint["state_dict"].items() if k.startswith(f"heads.{task}.")})
    hparams = dict(first["hyper_parameters"])
    hparams["tasks"] = {t: experts[t]["hyper_parameters"]["tasks"][t] for t in TASKS}
    hparams["baselines"] = {t: {"acc": expert_val[t]} for t in TASKS}
    data = {**first["datamodule_hyper_parameters"], "tasks": TASKS, "batch_size": 270}
    base = {"epoch": 0, "global_step": 0, "pytorch-lightning_version": pl.__version__, "state_dict": state,
            "hparams_name": first["hparams_name"], "hyper_parameters": hparams,
            "datamodule_hparams_name": first["datamodule_hparams_name"], "datamodule_hyper_parameters": data}  # fmt: skip
    torch.save(base, BASE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reuse", action="store_true", help="keep the checkpoints that exist")
    options = parser.parse_args()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    if not options.reuse and os.path.isdir(ROOT):
        shutil.rmtree(ROOT)  # the recipes' log folders have fixed names, which the command line never overwrites
    shutil.rmtree(TABLE, ignore_errors=True)
    start = time.perf_counter()
    timings = {}

    run(["--config", "configs/merging/pretrain.yaml"], options.reuse, PRETRAIN)
    timings["pretrain"] = time.perf_counter() - start
    for task in TASKS:
        run(["--config", "configs/merging/finetune.yaml", "--config", f"configs/merging/tasks/{task}.yaml"],
            options.reuse, expert_path(task))  # fmt: skip
    timings["experts"] = time.perf_counter() - start - timings["pretrain"]

    t0 = time.perf_counter()
    expert_val = {t: summary_metrics(f"{ROOT}/experts/{t}")[f"best/val/{t}/acc"] for t in TASKS}
    write_base(expert_val)
    rows = ["theta_0"]
    cli(["test", "--ckpt_path", BASE, *table_logger("theta_0"), *QUIET])
    lambdas = {}
    for method in ("averaging", "task_arithmetic", "ties"):
        merged = cli(["merge", "--config", f"configs/merging/{method}.yaml"])
        lambdas[method] = merged["coef"]
        label = method if method == "averaging" else f"{method}_lambda={merged['coef']:g}"
        cli(["test", "--ckpt_path", merged["output"], *table_logger(label), *QUIET])
        rows.append(label)
    timings["merges"] = time.perf_counter() - t0

    for granularity in ("task", "block"):
        t0 = time.perf_counter()
        label = f"atlas_{granularity}"
        checkpoint = {"class_path": "ModelCheckpoint", "init_args": {
            "dirpath": f"{ROOT}/{label}", "filename": "best", "monitor": "val/mean/norm_acc", "mode": "max",
            "enable_version_counter": False}}  # fmt: skip
        recipe = ["--config", "configs/merging/atlas.yaml", "--model.init_args.granularity", granularity,
                  "--model.init_args.expert_accuracy", json.dumps(expert_val)]  # fmt: skip
        best = f"{ROOT}/{label}/best.ckpt"
        if options.reuse and os.path.exists(best):  # the table was cleared above: test the kept coefficients again
            cli(["test", *recipe, "--ckpt_path", best, *table_logger(label), *QUIET])
        else:
            run([*recipe, "--trainer.callbacks", json.dumps([checkpoint]), "--test_after_fit", "true",
                 *table_logger(label)], options.reuse, best)  # fmt: skip
        rows.append(label)
        timings[label] = time.perf_counter() - t0

    t0 = time.perf_counter()
    graft_acc, kept, masks = {}, {}, {}
    for task in TASKS:
        mask_file = f"{ROOT}/grafting/{task}.mask"
        run(["--config", "configs/merging/grafting.yaml", "--data.init_args.tasks", task,
             "--model.init_args.task", task, "--model.init_args.expert", expert_path(task),
             "--model.init_args.mask_path", mask_file, "--trainer.logger.init_args.version", task,
             "--test_after_fit", "true"],
            options.reuse, mask_file)  # fmt: skip
        masks[task] = load_mask(mask_file)
        kept[task] = sum(int(m.sum()) for m in masks[task].values()) / sum(m.numel() for m in masks[task].values())
        graft_acc[f"test/{task}/acc"] = summary_metrics(f"{ROOT}/grafting/{task}")[f"test/{task}/acc"]
    label = "grafting_one_model_per_task"
    os.makedirs(f"{TABLE}/{label}", exist_ok=True)
    with open(f"{TABLE}/{label}/run_summary.json", "w") as f:  # the six grafted models' test accuracies, one row
        json.dump({"metrics": graft_acc, "config": {"runs": [f"{ROOT}/grafting/{t}" for t in TASKS]}}, f, indent=1)
    rows.append(label)
    timings["grafting"] = time.perf_counter() - t0

    cli(["report", *[f"{TABLE}/{row}" for row in rows], "--baselines", *[f"{ROOT}/experts/{t}" for t in TASKS],
         "--normalised", "--metrics", "acc", "--out", f"{ROOT}/report"])  # fmt: skip
    timings["total"] = time.perf_counter() - start

    print("\ngrafted share of each task vector: " + ", ".join(f"{t} {100 * kept[t]:.2f} %" for t in TASKS))
    print("mask IoU between tasks:")
    print("| | " + " | ".join(TASKS) + " |\n|---|" + "---|" * len(TASKS))
    for a in TASKS:
        print(f"| {a} | " + " | ".join(f"{mask_iou(masks[a], masks[b]):.3f}" for b in TASKS) + " |")
    print("\ntimings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    print(json.dumps({"expert_val": expert_val, "lambdas": lambdas, "grafted_share": kept, "timings_s": timings}))


if __name__ == "__main__":
    main()
