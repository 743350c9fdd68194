"""The composed recipes of configs/, generated from the files and the registries: each multi-task data set
(configs/data/*.yaml) with each method (configs/methods/*.yaml, one per registered aggregator), with F-MTL
and with its single-task baselines; each family's data sets with its methods (configs/<family>/...).

``compose(...)`` gives the command-line arguments of one combination, including the flags with which a
data set's published runs differ from a method file (the data file's header names them)."""

from __future__ import annotations

from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _stems(folder: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / folder).glob("*.yaml"))


DATA = _stems("data")
METHODS = [m for m in _stems("methods") if not m.startswith("fmtl")]
SINGLE_TASK = {data: [s for s in _stems("single_task") if s.startswith(data + "_")] for data in DATA}
# F-MTL as the official code runs it (ASAM, rho 2) on the dense and CelebA benchmarks, plain SAM on the digits
SAM_FMTL = ("multidigits", "multi_mnist", "multi_fashion", "multi_fashion_mnist")
# (data, method): the flags of the data set's published runs that differ from the method file
CELLS = {
    **{(data, "nashmtl"): ["--trainer.gradient_clip_val=null"]
       for data in ("multi_mnist", "multi_fashion", "multi_fashion_mnist", "celeba")},
    ("nyuv2_libmtl", "cagrad"): ["--model.init_args.aggregator.init_args.c=0.5"],
}  # fmt: skip

CONTINUAL_DATA = _stems("continual/data")
CONTINUAL_METHODS = _stems("continual/methods")
CONTINUAL_CELLS = {
    ("digits", "er"): ["--data.init_args.memory_size=100"],
    ("digits", "ovor"): ["--trainer.callbacks.init_args.k=10", "--trainer.callbacks.init_args.num_boundary=10",
                         "--trainer.callbacks.init_args.num_candidates=100", "--trainer.callbacks.init_args.num_outliers=20"],
}  # fmt: skip
SSL_DATA = _stems("ssl/data")
SSL_METHODS = _stems("ssl/methods")
MIXUP_DATA = _stems("mixup/data")
MIXUP_METHODS = _stems("mixup/methods")
MIXUP_CELLS = {
    ("digits", "mixup"): ["--trainer.callbacks.init_args.log_every_n_steps=null"],
    ("digits", "cutmix"): ["--trainer.callbacks.init_args.log_every_n_steps=null",
                           "--trainer.callbacks.init_args.mix.init_args.alpha=1.0"],
}  # fmt: skip


def configs(*paths: str) -> list[str]:
    return [arg for path in paths for arg in ("--config", str(CONFIGS / path))]


def compose(data: str, method: str | None = None, fmtl: bool = False, single_task: str | None = None) -> list[str]:
    """A multi-task run: the data file, then a method (and F-MTL) or a single-task overlay."""
    if single_task is not None:
        return configs(f"data/{data}.yaml", f"single_task/{single_task}.yaml")
    args = configs(f"data/{data}.yaml", f"methods/{method}.yaml")
    if fmtl:
        args += configs("methods/fmtl_sam.yaml" if data in SAM_FMTL else "methods/fmtl.yaml")
    return args + CELLS.get((data, method), [])


def compose_family(family: str, data: str, method: str) -> list[str]:
    """A continual, SSL or mixup run: the family's data file, then its method (or linear evaluation)."""
    if family == "ssl" and method == "linear_eval":
        return configs(f"ssl/data/{data}.yaml", f"ssl/linear_eval/{data}.yaml")
    cells = {"continual": CONTINUAL_CELLS, "mixup": MIXUP_CELLS}.get(family, {})
    return configs(f"{family}/data/{data}.yaml", f"{family}/methods/{method}.yaml") + cells.get((data, method), [])
