"""``python -m lightning_mtl merge --config configs/merging/ties.yaml``: merge expert checkpoints into one.

The config names the pre-trained Lightning checkpoint (``base``), the experts fine-tuned from it
(``experts``: ``.ckpt``, ``.pt``, ``.pth`` or ``.safetensors`` with the same keys), the merge
(``method`` and ``method_args``, see :func:`~lightning_mtl.merging.list_merges`), the entries merged
(``include`` / ``exclude`` name prefixes) and either a fixed ``coef`` or a ``grid`` searched with
``trainer.validate`` on ``data`` by ``metric`` / ``mode``. It writes a Lightning checkpoint of the merged
model at ``output``: the base checkpoint's hyper-parameters with the merged ``state_dict``, so
``Model.load_from_checkpoint(output)`` and ``python -m lightning_mtl test --ckpt_path output`` read it.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_mtl.merging.registry import create_merge, list_merges
from lightning_mtl.merging.search import search_coefficient
from lightning_mtl.merging.task_vector import TaskVector, load_state_dict

__all__ = ["build_parser", "main", "merge_checkpoints"]

DESCRIPTION = (
    "Merge expert checkpoints fine-tuned from one base into a single Lightning checkpoint (task arithmetic, TIES, "
    "weight averaging), with an optional coefficient search over trainer.validate."
)


def build_parser(prog: str = "lightning-mtl merge") -> Any:
    """The ``merge`` command's jsonargparse parser (``--config`` files and flags compose as in ``fit``)."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog=prog, description=DESCRIPTION, default_meta=False)
    parser.add_argument("--config", action=ActionConfigFile, help="A YAML config (repeatable; later ones override).")
    parser.add_argument("--base", type=str, required=True, help="The pre-trained model's Lightning checkpoint (.ckpt).")
    parser.add_argument("--experts", type=list[str], required=True, help="The fine-tuned experts' checkpoints.")
    parser.add_argument("--output", type=str, required=True, help="Where to write the merged model's checkpoint.")
    parser.add_argument("--model", type=str | None, default=None,
                        help="Class path or short name of the LightningModule; default: the one the base was trained with.")  # fmt: skip
    parser.add_argument(
        "--method", type=str, default="task_arithmetic", help=f"The merge, one of {', '.join(list_merges())}."
    )
    parser.add_argument(
        "--method_args", type=dict, default={}, help="Keyword arguments of the merge (TIES: k, scope, merge_func)."
    )
    parser.add_argument(
        "--include", type=list[str] | None, default=None, help="Merge only entries whose names start so."
    )
    parser.add_argument(
        "--exclude",
        type=list[str] | None,
        default=None,
        help="Leave entries whose names start so at the base's values.",
    )
    parser.add_argument(
        "--coef", type=float | None, default=None, help="The coefficient lambda; default: the method's."
    )
    parser.add_argument(
        "--grid", type=list[float] | None, default=None, help="Coefficients to validate; the best is kept."
    )
    parser.add_subclass_arguments(pl.LightningDataModule, "data", required=False, instantiate=True)
    parser.add_argument(
        "--metric", type=str, default="val/mean/acc", help="The validation metric the grid search compares."
    )
    parser.add_argument(
        "--mode", type=str, default="max", choices=["max", "min"], help="Whether a higher or lower metric is better."
    )
    parser.add_argument("--trainer", type=dict, default={}, help="Keyword arguments of the validating Trainer.")
    parser.add_argument("--seed_everything", type=int | None, default=0, help="Seed set before the data is built.")
    return parser


def _subclasses(cls: type) -> list[type]:
    found: list[type] = []
    subclasses: list[type] = cls.__subclasses__()
    for sub in subclasses:
        found += [sub, *_subclasses(sub)]
    return found


def _module_class(name: str | None, checkpoint: dict[str, Any], base: str) -> type[pl.LightningModule]:
    if name is None:
        name = (checkpoint.get("hyper_parameters") or {}).get("_class_path")
        if name is None:
            raise ValueError(f"{base!r} does not record its model class (it was not written by the CLI); give --model")
    if "." in name:
        module, _, attr = name.rpartition(".")
        cls = getattr(importlib.import_module(module), attr, None)
    else:  # a short name among the modules imported so far (the command line imports every family first)
        cls = next((c for c in _subclasses(pl.LightningModule) if c.__name__ == name), None)
    if not (isinstance(cls, type) and issubclass(cls, pl.LightningModule)):
        raise ValueError(f"model {name!r} is not a LightningModule class path or short name")
    return cls


def merge_checkpoints(
    base: str,
    experts: list[str],
    output: str,
    model: str | None = None,
    method: str = "task_arithmetic",
    method_args: dict[str, Any] | None = None,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    coef: float | None = None,
    grid: list[float] | None = None,
    data: pl.LightningDataModule | None = None,
    metric: str = "val/mean/acc",
    mode: str = "max",
    trainer: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Merge ``experts`` into ``base`` and write the merged model's Lightning checkpoint to ``output``.

    Returns a summary: the output path, the method, the coefficient used and the grid's scores. The
    arguments are the command's (see the module docstring); the checkpoint also records them under
    ``"merging"``.
    """
    if not experts:
        raise ValueError("experts is empty; give the fine-tuned checkpoints to merge")
    if grid is not None and data is None:
        raise ValueError(
            "a coefficient grid is validated on data: give --data (a LightningDataModule) or a fixed --coef"
        )
    if not os.path.isfile(base):
        raise FileNotFoundError(f"base checkpoint {base!r} does not exist")
    merge = create_merge(method, **(method_args or {}))
    checkpoint = torch.load(base, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(
            f"base {base!r} is not a Lightning checkpoint (no 'state_dict' entry); the merge writes one from it"
        )
    module = _module_class(model, checkpoint, base).load_from_checkpoint(base, map_location="cpu")
    base_state = checkpoint["state_dict"]
    vectors = [TaskVector.from_state_dicts(base_state, load_state_dict(path), include, exclude) for path in experts]
    merged = merge(vectors)
    del vectors  # the merged vector is all that is needed from here on
    scores: dict[float, float] = {}
    if grid is not None:
        validator = pl.Trainer(**{"logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
                                  "enable_model_summary": False, **(trainer or {})})  # fmt: skip
        found = search_coefficient(module, merged, grid, validator, datamodule=data, metric=metric, mode=mode)  # type: ignore[arg-type]  # checked above
        coef, scores = found.best_coef, found.scores
    else:
        coef = merge.default_coef if coef is None else coef
        merged.apply_to(module, coef)
    record = {"method": merge.registry_name, "method_args": dict(method_args or {}), "coef": coef, "base": base,
              "experts": list(experts), "include": include, "exclude": exclude, "metric": metric, "scores": scores}  # fmt: skip
    out = {
        key: checkpoint[key]
        for key in ("hyper_parameters", "hparams_name", "datamodule_hyper_parameters")
        if key in checkpoint
    }
    out.update({"epoch": 0, "global_step": 0, "pytorch-lightning_version": pl.__version__,
                "state_dict": module.state_dict(), "merging": record})  # fmt: skip
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save(out, partial)
    os.replace(partial, path)  # never a truncated file where a good one was
    return {"output": str(path), **record}


def main(args: list[str] | None = None, prog: str = "lightning-mtl merge") -> dict[str, Any]:
    """Parse ``args`` (the command line after ``merge``), merge, print a summary line and return it.

    Short class names in the config (``data: MultiDigits``) resolve among the imported classes:
    ``python -m lightning_mtl merge`` imports every family first (:func:`lightning_mtl.import_families`).
    """
    parser = build_parser(prog)
    config = parser.parse_args(args)
    if config.seed_everything is not None:
        pl.seed_everything(config.seed_everything, verbose=False)
    init = parser.instantiate_classes(config)
    summary = merge_checkpoints(
        base=init.base, experts=init.experts, output=init.output, model=init.model, method=init.method,
        method_args=init.method_args, include=init.include, exclude=init.exclude, coef=init.coef, grid=init.grid,
        data=init.data, metric=init.metric, mode=init.mode, trainer=init.trainer,
    )  # fmt: skip
    scores = ", ".join(f"{c:g}: {v:.4f}" for c, v in summary["scores"].items())
    print(f"merged {len(summary['experts'])} experts by {summary['method']} at coef {summary['coef']:g}"
          + (f" ({summary['metric']} {scores})" if scores else "") + f" -> {summary['output']}", flush=True)  # fmt: skip
    return summary
