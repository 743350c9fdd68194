"""Every benchmark recipe of configs/{multi_mnist,multi_fashion,multi_fashion_mnist,celeba,nyuv2,cityscapes} through
the real CLI (``fast_dev_run``) on tiny fixtures in the real on-disk formats. Overrides only shrink the networks
(SegNet widths, ResNet-50 -> ResNet-18, the CelebA encoder) so that a CPU runs them in seconds.

A CLI run costs 1-15 s here (CelebA's 40 tasks alone take several seconds to parse), so the default run takes one
recipe per model family (and every Multi-MNIST recipe, the cheapest) through the CLI and checks that every other
recipe of the family differs from it only in the method (aggregator, run name, clipping); ``pytest -m long`` runs
every recipe through the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lightning_mtl.cli import main
from tests.fixtures.celeba import write_celeba
from tests.fixtures.dense import write_cityscapes, write_nyuv2
from tests.fixtures.mnist import write_mnist_raw
from tests.fixtures.trainers import one_thread  # noqa: F401 (autouse fixture)

ROOT = Path(__file__).resolve().parents[2] / "configs"
FOLDERS = ("multi_mnist", "multi_fashion", "multi_fashion_mnist", "celeba", "nyuv2", "cityscapes")
CONFIGS = sorted(p for folder in FOLDERS for p in (ROOT / folder).glob("*.yaml"))
# one recipe per family (folder x architecture) runs by default; each family differs only in the method
REPRESENTATIVES = {"multi_mnist/pcgrad", "multi_fashion/mgda", "multi_fashion_mnist/nashmtl", "celeba/cagrad",
                   "nyuv2/nashmtl", "nyuv2/libmtl_imtl_g", "nyuv2/single_normal", "cityscapes/imtl_g",
                   "cityscapes/single_segmentation", "multi_mnist/fmtl_pcgrad", "multi_fashion/fmtl_mgda",
                   "multi_fashion_mnist/fmtl_nashmtl", "celeba/fmtl_cagrad", "nyuv2/fmtl_cagrad",
                   "cityscapes/fmtl_imtl_g"}  # fmt: skip


def _family(config: Path) -> str:
    name = config.stem
    kind = next((k for k in ("libmtl", "single", "fmtl") if name.startswith(k + "_")), "mtl")
    return f"{config.parent.name}/{kind}"


def _key(config: Path) -> str:
    return f"{config.parent.name}/{config.stem}"


def _params():
    for config in CONFIGS:
        # the cheapest family also runs every method by default: each aggregator spec goes through the CLI
        default = _key(config) in REPRESENTATIVES or config.parent.name == "multi_mnist"
        marks = () if default else (pytest.mark.long,)
        yield pytest.param(config, marks=marks, id=_key(config))
FAST = ["--trainer.fast_dev_run=true", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--trainer.accelerator=cpu", "--data.init_args.num_workers=0", "--test_after_fit=false"]  # fmt: skip
METHOD_AGGREGATORS = {"ls": "ls", "mgda": "mgda", "pcgrad": "pcgrad", "cagrad": "CAGrad", "imtl_g": "imtl_g",
                      "nashmtl": "NashMTL"}  # fmt: skip
TINY_SEGNET = ["--model.init_args.encoder.init_args.backbone.init_args.channels=[4,4,4,4,4]"]


@pytest.fixture(scope="module")
def data_roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("benchmark_data")
    write_mnist_raw(base / "digits", "MNIST", n_train=6, n_test=3)
    write_mnist_raw(base / "digits", "FashionMNIST", n_train=6, n_test=3, seed=1)
    write_celeba(base / "faces", n=6, size=12)
    write_nyuv2(base / "nyuv2", n_train=2, n_val=2, size=(32, 32))
    write_cityscapes(base / "cityscapes", n_train=2, n_val=2, size=(32, 32))
    return {"digits": base / "digits", "faces": base / "faces", "nyuv2": base / "nyuv2", "cityscapes": base / "cityscapes"}


def _overrides(config: Path, roots: dict) -> list[str]:
    folder, name = config.parent.name, config.stem
    if folder.startswith("multi_"):
        return [f"--data.init_args.root={roots['digits']}", "--data.init_args.batch_size=8"]
    if folder == "celeba":
        return [f"--data.init_args.root={roots['faces']}", "--data.init_args.image_size=16",
                "--model.init_args.encoder.init_args.model_name=test_resnet"]  # fmt: skip
    args = [f"--data.init_args.root={roots[folder]}", "--data.init_args.batch_size=2"]
    if name.startswith("libmtl_"):
        args.append("--model.init_args.encoder.init_args.backbone.init_args.model_name=resnet18")
        for task in ("segmentation", "depth", "normal"):
            args += [f"--model.init_args.tasks.{task}.init_args.head.init_args.in_channels=512",
                     f"--model.init_args.tasks.{task}.init_args.head.init_args.width=8"]  # fmt: skip
        return args
    return args + TINY_SEGNET


def test_every_benchmark_folder_has_the_six_methods():
    for folder in FOLDERS:
        names = {p.stem for p in (ROOT / folder).glob("*.yaml")}
        assert {"ls", "mgda", "pcgrad", "cagrad", "imtl_g", "nashmtl"} <= names, folder
        assert {"fmtl_" + m for m in ("ls", "mgda", "pcgrad", "cagrad", "imtl_g", "nashmtl")} <= names, folder
    assert {"libmtl_" + m for m in ("ls", "mgda", "pcgrad", "cagrad", "imtl_g", "nashmtl")} <= {
        p.stem for p in (ROOT / "nyuv2").glob("*.yaml")}


def _without_method(config: Path) -> dict:
    """The recipe minus what legitimately differs between the methods of one family."""
    data = yaml.safe_load(config.read_text())
    data["model"]["init_args"].pop("aggregator")
    data["model"]["init_args"].pop("fmtl", None)  # one F-MTL block per family, checked below
    data["trainer"]["logger"]["init_args"].pop("name")
    data["trainer"].pop("gradient_clip_val", None)  # Nash-MTL's max_norm
    if config.stem.startswith("single_"):  # single-task recipes differ in their task, data tasks and monitor
        for key in ("tasks",):
            data["model"]["init_args"].pop(key)
        data["data"]["init_args"].pop("tasks", None)
        data["trainer"].pop("callbacks")
    return data


def test_recipes_of_a_family_differ_only_in_the_method():
    """What the default run does not take through the CLI is the same recipe with another method."""
    families: dict[str, list[Path]] = {}
    for config in CONFIGS:
        families.setdefault(_family(config), []).append(config)
    for family, members in families.items():
        reference = [c for c in members if _key(c) in REPRESENTATIVES]
        assert len(reference) == 1, family
        expected = _without_method(reference[0])
        fmtl = {yaml.dump(yaml.safe_load(c.read_text())["model"]["init_args"].get("fmtl")) for c in members}
        assert len(fmtl) == 1, f"{family}: the F-MTL settings differ between methods"
        for config in members:
            assert _without_method(config) == expected, f"{_key(config)} differs from {_key(reference[0])} beyond the method"
            aggregator = yaml.safe_load(config.read_text())["model"]["init_args"]["aggregator"]
            name = aggregator if isinstance(aggregator, str) else aggregator["class_path"]
            method = "ls" if config.stem.startswith("single_") else config.stem.removeprefix("libmtl_").removeprefix("fmtl_")
            assert name == METHOD_AGGREGATORS[method], config


@pytest.mark.parametrize("config", list(_params()))
def test_benchmark_recipe_runs_through_the_cli(config, data_roots):
    cli = main(["fit", "--config", str(config), *FAST, *_overrides(config, data_roots)])
    assert cli.trainer.state.finished and cli.trainer.global_step == 1
    logged = cli.trainer.callback_metrics
    tasks = cli.model.task_names
    assert all(any(f"{stage}/{task}/loss" in logged for stage in ("train", "val", "test")) for task in tasks)
