"""Checks that each recipe of the old one-file-per-run layout (before configs were composed) resolves to the
same run as its composition of ``configs/`` files: ``--print_config`` of both, compared after
normalizing what does not change the run (how a class is spelled, the logger's folder and run name, the
order of the callbacks, in which Lightning runs checkpoint callbacks last anyway).

    git archive e8c1afd configs | tar -x -C OLD   # the last commit with the old layout
    python benchmarks/config_equivalence.py OLD/configs

Prints one line per old recipe and exits non-zero when any differs.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import sys
from pathlib import Path
from typing import Any

import yaml

from lightning_mtl.cli import MultiTaskCLI

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MTL = ("multidigits", "multi_mnist", "multi_fashion", "multi_fashion_mnist", "celeba", "nyuv2", "cityscapes")
SAM_FMTL = ("multidigits", "multi_mnist", "multi_fashion", "multi_fashion_mnist")  # F-MTL with plain SAM
NO_CLIP = ("multi_mnist", "multi_fashion", "multi_fashion_mnist", "celeba")  # Nash-MTL runs without clipping
DIGIT_FLAGS = {  # the quick digits versions of the CIFAR-100 mixup recipes (configs/mixup/data/digits.yaml)
    "mixup": ["--trainer.callbacks.init_args.log_every_n_steps=null"],
    "cutmix": [
        "--trainer.callbacks.init_args.log_every_n_steps=null",
        "--trainer.callbacks.init_args.mix.init_args.alpha=1.0",
    ],  # fmt: skip
}
VOR_DIGITS = ["--trainer.callbacks.init_args.k=10", "--trainer.callbacks.init_args.num_boundary=10",
              "--trainer.callbacks.init_args.num_candidates=100", "--trainer.callbacks.init_args.num_outliers=20"]  # fmt: skip


def composition(old: str) -> list[str] | None:
    """The ``--config`` files and flags that replace the old recipe ``old`` (a path below configs/)."""
    folder, _, name = old.removesuffix(".yaml").rpartition("/")

    def cfg(*paths: str) -> list[str]:
        return [a for p in paths for a in ("--config", str(CONFIGS / p))]

    if old == "quickstart.yaml":
        return cfg("quickstart.yaml")
    if folder in MTL:
        if name.startswith("single_"):
            return cfg(f"data/{folder}.yaml", f"single_task/{folder}_{name.removeprefix('single_')}.yaml")
        data = "nyuv2_libmtl" if name.startswith("libmtl_") else folder
        method = name.removeprefix("libmtl_").removeprefix("fmtl_")
        args = cfg(f"data/{data}.yaml", f"methods/{method}.yaml")
        if name.startswith("fmtl_"):
            args += cfg("methods/fmtl_sam.yaml" if folder in SAM_FMTL else "methods/fmtl.yaml")
        if folder == "multidigits" and method == "pcgrad":
            args += cfg("trainer/conflict_monitor.yaml")
        if folder in NO_CLIP and method == "nashmtl":
            args.append("--trainer.gradient_clip_val=null")
        if data == "nyuv2_libmtl" and method == "cagrad":
            args.append("--model.init_args.aggregator.init_args.c=0.5")  # LibMTL's default c
        return args
    if folder == "digits" and name in ("sam", "asam_wrapper"):
        return cfg(f"sharpness/{name}.yaml")
    if folder in ("digits", "cifar100") and name in ("mixup", "cutmix"):
        args = cfg(f"mixup/data/{folder}.yaml", f"mixup/methods/{name}.yaml")
        return args + (DIGIT_FLAGS[name] if folder == "digits" else [])
    if folder in ("digits", "cifar100") and name in ("automix", "adautomix"):
        return cfg(f"mixup/{name}_{folder}.yaml")
    ssl = {
        "ssl": "digits",
        "cifar10": "cifar10",
        "cifar100": "cifar100",
        "stl10": "stl10",
        "tiny_imagenet": "tiny_imagenet",
    }
    if folder in ssl:
        data = ssl[folder]
        method = name.removeprefix("digits_")
        if method in ("linear_eval", "barlow_twins_linear"):
            return cfg(f"ssl/data/{data}.yaml", f"ssl/linear_eval/{data}.yaml")
        method = {"barlow_twins_mixed": "mixed_barlow_twins"}.get(method, method)
        return cfg(f"ssl/data/{data}.yaml", f"ssl/methods/{method}.yaml")
    if folder.startswith("continual/"):
        data = folder.removeprefix("continual/")
        args = cfg(f"continual/data/{data}.yaml", f"continual/methods/{name}.yaml")
        if data == "digits":  # the small stream's method settings (configs/continual/data/digits.yaml)
            args += {"ovor": VOR_DIGITS, "er": ["--data.init_args.memory_size=100"]}.get(name, [])
        return args
    return None


def resolved(args: list[str]) -> dict[str, Any]:
    """The config ``fit ... --print_config`` prints, as a dict."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        MultiTaskCLI(args=[*args, "--print_config"])
    return yaml.safe_load(out.getvalue())


def normalized(value: Any) -> Any:
    """Class paths as the class's defining module, callbacks with the checkpoints last (Lightning's order)."""
    if isinstance(value, dict):
        out = {k: normalized(v) for k, v in value.items()}
        if isinstance(out.get("class_path"), str):
            module, _, name = out["class_path"].rpartition(".")
            cls = getattr(importlib.import_module(module), name)
            out["class_path"] = f"{cls.__module__}.{cls.__qualname__}"
        return out
    if isinstance(value, list):
        return [normalized(v) for v in value]
    return value


def comparable(config: dict[str, Any]) -> dict[str, Any]:
    config = normalized(config)
    config.pop("config", None)
    trainer = config.get("trainer") or {}
    logger = trainer.get("logger")
    if isinstance(logger, dict):
        for key in ("save_dir", "name"):
            (logger.get("init_args") or {}).pop(key, None)
    callbacks = trainer.get("callbacks") or []
    trainer["callbacks"] = [c for c in callbacks if "Checkpoint" not in c["class_path"]] + [
        c for c in callbacks if "Checkpoint" in c["class_path"]]  # fmt: skip
    return config


def _diff(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str) for d in _diff(a.get(k), b.get(k), f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _diff(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def main(old_root: str) -> int:
    old = Path(old_root)
    sys.argv = sys.argv[:1]  # the CLI runs below read their own args only
    failures = 0
    for path in sorted(old.rglob("*.yaml")):
        rel = str(path.relative_to(old))
        if rel.split("/")[0] in ("loggers", "trainer"):
            continue
        args = composition(rel)
        if args is None:
            print(f"NO MAPPING  {rel}")
            failures += 1
            continue
        diff = _diff(comparable(resolved(["fit", "--config", str(path)])), comparable(resolved(["fit", *args])))
        shown = " ".join(a.replace(str(CONFIGS) + "/", "") for a in args if a != "--config")
        print(f"{'EQUAL' if not diff else 'DIFFERS'}  {rel}  <-  {shown}")
        for line in diff:
            print("    ", line)
        failures += bool(diff)
    print(f"{failures} recipe(s) differ")
    return int(failures > 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
