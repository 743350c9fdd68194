"""The multi-task recipes, composed from configs/data/<benchmark>.yaml and configs/methods/<name>.yaml (generated
from the aggregator registry, with F-MTL and the single-task baselines): every combination parses (cheap, by
default), the published setups hold on the composed configs, and combinations run through the real CLI
(``fast_dev_run``) on tiny fixtures in the real on-disk formats. Overrides only shrink the networks (SegNet
widths, ResNet-50 -> ResNet-18, the CelebA encoder) so that a CPU runs them in seconds.

A CLI run costs 1-15 s here, so the default run takes every method on MultiDigits (the cheapest) and one method,
F-MTL and each single-task baseline on every other data set through the CLI; ``pytest -m long`` runs every
combination."""

from __future__ import annotations

import pytest
import torch
import yaml

from lightning_mtl.aggregators import get_aggregator_class, list_aggregators
from lightning_mtl.cli import main
from tests.config_matrix import CELLS, DATA, METHODS, SAM_FMTL, SINGLE_TASK, compose
from tests.fixtures.celeba import write_celeba
from tests.fixtures.dense import write_cityscapes, write_nyuv2
from tests.fixtures.mnist import write_mnist_raw
from tests.fixtures.trainers import one_thread  # noqa: F401 (autouse fixture)

FAST = ["--trainer.fast_dev_run=true", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--trainer.accelerator=cpu", "--test_after_fit=false"]  # fmt: skip
TINY_SEGNET = ["--model.init_args.encoder.init_args.backbone.init_args.channels=[4,4,4,4,4]"]


def _printed(args: list[str], capsys) -> dict:
    """The resolved config of ``fit ARGS`` (``--print_config``: parsed and checked, nothing built)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_every_registered_aggregator_has_a_method_file_and_every_data_set_the_benchmarks():
    assert set(list_aggregators()) <= set(METHODS)
    assert {"multidigits", "multi_mnist", "multi_fashion", "multi_fashion_mnist", "celeba", "nyuv2", "nyuv2_libmtl",
            "cityscapes"} <= set(DATA)  # fmt: skip
    assert SINGLE_TASK["multidigits"] == ["multidigits_left", "multidigits_right"]
    assert SINGLE_TASK["nyuv2"] == ["nyuv2_depth", "nyuv2_normal", "nyuv2_segmentation"]
    assert SINGLE_TASK["cityscapes"] == ["cityscapes_depth", "cityscapes_segmentation"]


def _combinations():
    """Every combination; F-MTL with each aggregator only with ``-m long`` (one F-MTL file per data set, whose
    settings the published-setup test below checks)."""
    for data in DATA:
        for method in METHODS:
            yield pytest.param(data, method, False, None, id=f"{data}/{method}")
            yield pytest.param(data, method, True, None, id=f"{data}/fmtl_{method}", marks=pytest.mark.long)
        for single in SINGLE_TASK[data]:
            yield pytest.param(data, None, False, single, id=f"{data}/{single}")


@pytest.mark.parametrize("data, method, fmtl, single", list(_combinations()))
def test_every_combination_parses_to_its_method(data, method, fmtl, single, capsys):
    config = _printed(compose(data, method, fmtl, single), capsys)
    init = config["model"]["init_args"]
    name = "ls" if single else ("mgda" if method == "mgda_ub" else method)
    assert init["aggregator"]["class_path"].rsplit(".", 1)[1] == get_aggregator_class(name).__name__
    assert (init["gradient_mode"] == "representation") == (method == "mgda_ub")
    assert (init["fmtl"] is not None) == fmtl
    if single:
        task = single.removeprefix(data + "_")
        assert list(init["tasks"]) == [task]
        assert config["trainer"]["callbacks"][0]["init_args"]["monitor"].startswith(f"val/{task}/")
        assert init["baselines"] is None
    else:
        assert config["trainer"]["logger"]["init_args"]["name"] == method


PUBLISHED = {  # data: (optimizer, lr, weight decay, epochs, batch size, scheduler)
    "multidigits": ("Adam", 0.002, 0, 6, 256, "CosineAnnealingLR"),
    "multi_mnist": ("SGD", 0.001, 0, 100, 256, "MultiStepLR"),
    "multi_fashion": ("SGD", 0.001, 0, 100, 256, "MultiStepLR"),
    "multi_fashion_mnist": ("SGD", 0.001, 0, 100, 256, "MultiStepLR"),
    "celeba": ("Adam", 0.001, 0, 15, 256, None),
    "nyuv2": ("Adam", 0.0001, 0, 200, 2, "StepLR"),
    "nyuv2_libmtl": ("Adam", 0.0001, 1e-5, 200, 8, "StepLR"),
    "cityscapes": ("Adam", 0.0001, 0, 200, 8, "StepLR"),
}


@pytest.mark.parametrize("data", DATA)
def test_the_published_setups_hold_on_the_composed_configs(data, capsys):
    optimizer, lr, weight_decay, epochs, batch_size, scheduler = PUBLISHED[data]
    config = _printed(compose(data, "nashmtl", fmtl=True), capsys)
    init = config["model"]["init_args"]
    assert init["optimizer"]["class_path"].endswith(optimizer)
    assert (init["optimizer"]["init_args"]["lr"], init["optimizer"]["init_args"]["weight_decay"]) == (lr, weight_decay)
    assert (init["lr_scheduler"] or {}).get("class_path", "").rsplit(".", 1)[-1] == (scheduler or "")
    assert (config["trainer"]["max_epochs"], config["data"]["init_args"]["batch_size"]) == (epochs, batch_size)
    # Nash-MTL clips at 1.0 (its paper) except where the benchmark's published runs do not clip
    assert config["trainer"]["gradient_clip_val"] == (None if (data, "nashmtl") in CELLS else 1.0)
    fmtl = init["fmtl"]["init_args"]
    expected = (0.05, False, "joint") if data in SAM_FMTL else (2.0, True, "separate")
    assert (fmtl["rho"], fmtl["adaptive"], fmtl["normalization"]) == expected
    cagrad = _printed(compose(data, "cagrad"), capsys)["model"]["init_args"]["aggregator"]["init_args"]
    assert cagrad["c"] == (0.5 if data == "nyuv2_libmtl" else 0.4)  # LibMTL's default c


@pytest.fixture(scope="module")
def data_roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("benchmark_data")
    write_mnist_raw(base / "digits", "MNIST", n_train=6, n_test=3)
    write_mnist_raw(base / "digits", "FashionMNIST", n_train=6, n_test=3, seed=1)
    write_celeba(base / "faces", n=6, size=12)
    write_nyuv2(base / "nyuv2", n_train=2, n_val=2, size=(32, 32))
    write_cityscapes(base / "cityscapes", n_train=2, n_val=2, size=(32, 32))
    return {
        "digits": base / "digits",
        "faces": base / "faces",
        "nyuv2": base / "nyuv2",
        "cityscapes": base / "cityscapes",
    }


def _overrides(data: str, roots: dict) -> list[str]:
    if data == "multidigits":
        return []
    if data.startswith("multi_"):
        return [
            f"--data.init_args.root={roots['digits']}",
            "--data.init_args.batch_size=8",
            "--data.init_args.num_workers=0",
        ]
    if data == "celeba":
        return [f"--data.init_args.root={roots['faces']}", "--data.init_args.image_size=16", "--data.init_args.num_workers=0",
                "--model.init_args.encoder.init_args.model_name=test_resnet"]  # fmt: skip
    args = [f"--data.init_args.root={roots[data.removesuffix('_libmtl')]}", "--data.init_args.batch_size=2",
            "--data.init_args.num_workers=0"]  # fmt: skip
    if data == "nyuv2_libmtl":
        args.append("--model.init_args.encoder.init_args.backbone.init_args.model_name=resnet18")
        for task in ("segmentation", "depth", "normal"):
            args += [f"--model.init_args.tasks.{task}.init_args.head.init_args.in_channels=512",
                     f"--model.init_args.tasks.{task}.init_args.head.init_args.width=8"]  # fmt: skip
        return args
    return args + TINY_SEGNET


def _runs():
    """Every combination; by default every method on MultiDigits and, elsewhere, one method (a different one on
    each data set), F-MTL and the single-task baselines."""
    for i, data in enumerate(DATA):
        default_method = METHODS[(3 * i) % len(METHODS)]
        for method in METHODS:
            for fmtl in (False, True):
                default = (data == "multidigits" and not fmtl) or (method == default_method)
                marks = () if default else (pytest.mark.long,)
                yield pytest.param(data, method, fmtl, None, marks=marks, id=f"{data}/{'fmtl_' * fmtl}{method}")
        for single in SINGLE_TASK[data]:
            yield pytest.param(data, None, False, single, id=f"{data}/{single}")


@pytest.fixture
def _determinism_restored():
    """MultiDigits trains deterministically; Lightning leaves the global switch on after the run, which SegNet's
    max-unpooling (no deterministic kernel) in a later run of the same process must not inherit."""
    enabled = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(enabled)


@pytest.mark.usefixtures("_determinism_restored")
@pytest.mark.parametrize("data, method, fmtl, single", list(_runs()))
def test_combination_runs_through_the_cli(data, method, fmtl, single, data_roots, tmp_path):
    save = [f"--trainer.logger.init_args.save_dir={tmp_path}"]
    cli = main(["fit", *compose(data, method, fmtl, single), *FAST, *save, *_overrides(data, data_roots)])
    assert cli.trainer.state.finished and cli.trainer.global_step == 1
    logged = cli.trainer.callback_metrics
    tasks = cli.model.task_names
    assert all(any(f"{stage}/{task}/loss" in logged for stage in ("train", "val", "test")) for task in tasks)
