"""The DigitsTasks merging pipeline: pre-train, fine-tune T experts, merge, one table.

Every training runs through the command line's entry point (``lightning_mtl.cli.main``, what
``python -m lightning_mtl fit --config ...`` calls) with the recipes of ``configs/merging/``:

1. ``pretrain.yaml``: theta_0, a DigitsCNN on the plain digits;
2. ``finetune.yaml`` + ``tasks/<task>.yaml``: one expert per task;
3. ``atlas.yaml`` (granularity ``task`` and ``block``) and ``grafting.yaml`` (one mask per task).

Weight averaging (every coefficient 1/T) and task arithmetic (one coefficient for all, chosen on the
validation split from 0.1 .. 1.0) are computed here. The table gives each method's test accuracy per
task, normalised by the expert's test accuracy, and the mean; grafting is not a merge (one grafted
model per task) and is listed for its localisation: the share of the task vector it keeps and how much
of the expert's accuracy that share holds, with the masks' IoU between tasks.

    python examples/merging_pipeline.py            # about 9 minutes on 2 shared CPU cores
    python examples/merging_pipeline.py --reuse    # keep checkpoints that exist already
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import lightning.pytorch as pl
import torch

from lightning_mtl.architectures import DigitsCNN
from lightning_mtl.cli import main as cli
from lightning_mtl.datamodules import DigitsTasks
from lightning_mtl.merging import ATLAS, PretrainedEncoder, load_mask, mask_iou

TASKS = ["rotate90", "invert", "permute", "parity", "mod3", "hflip"]
ROOT = "runs/merging"
PRETRAIN = f"{ROOT}/pretrain/best.ckpt"


def expert_path(task: str) -> str:
    return f"{ROOT}/experts/{task}/best.ckpt"


def run(args: list[str], reuse: bool, output: str) -> None:
    if reuse and os.path.exists(output):
        return
    if os.path.exists(output):
        os.remove(output)
    cli(["fit", *args, "--trainer.enable_model_summary", "false"])


def evaluator() -> ATLAS:
    """Every expert's vector and head on theta_0; its coefficients pick the merge to evaluate."""
    encoder = PretrainedEncoder(DigitsCNN(in_channels=1, out_features=128), PRETRAIN)
    return ATLAS(encoder, experts={t: expert_path(t) for t in TASKS}, granularity="task", targets=TASKS)


def accuracies(module: ATLAS, coefficients: torch.Tensor, split: str) -> dict[str, float]:
    with torch.no_grad():
        module.coefficients.copy_(coefficients.view_as(module.coefficients))
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    data = DigitsTasks(TASKS, batch_size=270)
    run_eval = trainer.validate if split == "val" else trainer.test
    metrics = run_eval(module, datamodule=data, verbose=False)[0]
    return {t: float(metrics[f"{split}/{t}/acc"]) for t in TASKS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reuse", action="store_true", help="keep the checkpoints that exist")
    options = parser.parse_args()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    if not options.reuse and os.path.isdir(ROOT):
        shutil.rmtree(ROOT)  # the recipes' log folders have fixed names, which the command line never overwrites
    start = time.perf_counter()
    timings = {}

    run(["--config", "configs/merging/pretrain.yaml"], options.reuse, PRETRAIN)
    timings["pretrain"] = time.perf_counter() - start
    for task in TASKS:
        run(["--config", "configs/merging/finetune.yaml", "--config", f"configs/merging/tasks/{task}.yaml"],
            options.reuse, expert_path(task))  # fmt: skip
    timings["experts"] = time.perf_counter() - start - timings["pretrain"]

    module = evaluator()
    n = len(TASKS)
    eye = torch.eye(n)
    expert_val = {t: accuracies(module, eye[i], "val")[t] for i, t in enumerate(TASKS)}
    expert_test = {t: accuracies(module, eye[i], "test")[t] for i, t in enumerate(TASKS)}
    rows: dict[str, dict[str, float]] = {"zero-shot (theta_0)": accuracies(module, torch.zeros(n), "test")}
    rows["weight averaging"] = accuracies(module, torch.full((n,), 1.0 / n), "test")

    def mean_norm(acc: dict[str, float], ref: dict[str, float]) -> float:
        return sum(acc[t] / ref[t] for t in TASKS) / n

    grid = [round(0.1 * k, 1) for k in range(1, 11)]
    scores = {lam: mean_norm(accuracies(module, torch.full((n,), lam), "val"), expert_val) for lam in grid}
    best_lam = max(scores, key=scores.__getitem__)
    rows[f"task arithmetic (lambda={best_lam})"] = accuracies(module, torch.full((n,), best_lam), "test")

    accuracy_args = ["--model.init_args.expert_accuracy", json.dumps(expert_val)]
    for granularity in ("task", "block"):
        t0 = time.perf_counter()
        out = f"{ROOT}/atlas_{granularity}/best.ckpt"
        checkpoint = {"class_path": "ModelCheckpoint", "init_args": {
            "dirpath": f"{ROOT}/atlas_{granularity}", "filename": "best", "monitor": "val/mean/norm_acc",
            "mode": "max", "enable_version_counter": False}}  # fmt: skip
        run(["--config", "configs/merging/atlas.yaml", "--model.init_args.granularity", granularity, *accuracy_args,
             "--trainer.callbacks", json.dumps([checkpoint]), "--trainer.logger.init_args.name", f"atlas_{granularity}"],
            options.reuse, out)  # fmt: skip
        learned = ATLAS(
            PretrainedEncoder(DigitsCNN(in_channels=1, out_features=128), PRETRAIN),
            experts={t: expert_path(t) for t in TASKS}, granularity=granularity, targets=TASKS,
        )  # fmt: skip
        learned.load_state_dict(torch.load(out, map_location="cpu", weights_only=True)["state_dict"])
        rows[f"aTLAS ({granularity})"] = accuracies(learned, learned.coefficients.detach(), "test")
        timings[f"atlas_{granularity}"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    graft_acc, kept, masks = {}, {}, {}
    for task in TASKS:
        mask_file = f"{ROOT}/grafting/{task}.mask"
        run(["--config", "configs/merging/grafting.yaml", "--data.init_args.tasks", task,
             "--model.init_args.task", task, "--model.init_args.expert", expert_path(task),
             "--model.init_args.mask_path", mask_file, "--trainer.logger.init_args.version", task],
            options.reuse, mask_file)  # fmt: skip
        masks[task] = load_mask(mask_file)
        kept[task] = sum(int(m.sum()) for m in masks[task].values()) / sum(m.numel() for m in masks[task].values())
        graft_acc[task] = graft_test_accuracy(task, masks[task])
    rows["grafting (one model per task)"] = graft_acc
    timings["grafting"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - start

    print(table(rows, expert_test))
    print("\ngrafted share of each task vector: " + ", ".join(f"{t} {100 * kept[t]:.2f} %" for t in TASKS))
    print("mask IoU between tasks:")
    print("| | " + " | ".join(TASKS) + " |\n|---|" + "---|" * n)
    for a in TASKS:
        print(f"| {a} | " + " | ".join(f"{mask_iou(masks[a], masks[b]):.3f}" for b in TASKS) + " |")
    print("\ntimings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    print(json.dumps({"expert_test": expert_test, "rows": rows, "grafted_share": kept, "lambda_ta": best_lam,
                      "timings_s": timings}))  # fmt: skip


def graft_test_accuracy(task: str, mask: dict[str, torch.Tensor]) -> float:
    """Test accuracy of theta_0 + mask * tau with the expert's head."""
    from lightning_mtl.merging import Grafting

    encoder = PretrainedEncoder(DigitsCNN(in_channels=1, out_features=128), PRETRAIN)
    module = Grafting(encoder, expert=expert_path(task), task=task)
    for i, name in enumerate(module.entry_names):
        getattr(module, f"best_mask{i}").copy_(mask[name])
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    return float(
        trainer.test(module, datamodule=DigitsTasks(task, batch_size=270), verbose=False)[0][f"test/{task}/acc"]
    )


def table(rows: dict[str, dict[str, float]], expert: dict[str, float]) -> str:
    lines = ["| method | " + " | ".join(TASKS) + " | mean acc | mean norm. acc |", "|---|" + "---|" * (len(TASKS) + 2)]
    for name, acc in {"experts (fine-tuned)": expert, **rows}.items():
        cells = [f"{100 * acc[t]:.1f} ({100 * acc[t] / expert[t]:.0f})" for t in TASKS]
        mean = sum(acc.values()) / len(TASKS)
        norm = sum(acc[t] / expert[t] for t in TASKS) / len(TASKS)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {100 * mean:.1f} | {100 * norm:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
