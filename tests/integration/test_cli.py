"""The command line end to end: every shipped config, config handling, errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning_mtl.cli import main

ROOT = Path(__file__).resolve().parents[2]
ALL_RECIPES = sorted(
    p for p in (ROOT / "configs").rglob("*.yaml") if p.parent.name not in ("loggers", "trainer")
)


def _needs_data_on_disk(config: Path) -> bool:
    """Recipes for data sets read from a user's disk (a ``root`` init arg): their own tests run them on a
    fixture written in the real format (tests/integration/test_continual_recipes.py for the streams); here only
    the embedded-data recipes run."""
    data = (yaml.safe_load(config.read_text()) or {}).get("data") or {}
    init = data.get("init_args") or {}
    source = (init.get("source") or {}).get("init_args") or {}  # a stream wrapping another data module
    return "root" in init or "root" in source


RECIPES = [p for p in ALL_RECIPES if not _needs_data_on_disk(p)]
FAST = ["--trainer.fast_dev_run=true", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


@pytest.mark.parametrize("config", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_recipe_runs_through_the_cli(config):
    cli = main(["fit", "--config", str(config), *FAST])
    assert cli.trainer.state.finished
    assert cli.trainer.global_step == 1


def test_configs_compose_and_the_resolved_config_is_saved_twice_into_one_folder(tmp_path):
    args = ["fit", "--config", str(ROOT / "configs/quickstart.yaml"), "--config", str(ROOT / "configs/loggers/csv.yaml"),
            "--trainer.max_steps=1", "--trainer.limit_val_batches=1", "--test_after_fit=false",
            "--trainer.enable_progress_bar=false", f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.logger.init_args.version=fixed"]  # fmt: skip
    for _ in range(2):  # the second run writes into the same folder: the config is overwritten, not refused
        cli = main(args)
    saved = yaml.safe_load((Path(cli.trainer.log_dir) / "config.yaml").read_text())
    assert saved["model"]["class_path"].endswith("MultiTaskModule")
    assert saved["trainer"]["max_steps"] == 1


def test_print_config_and_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "configs/quickstart.yaml"), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_args"]["tasks"]["left"]["init_args"]["num_classes"] == 10
    assert printed["model"]["init_args"]["optimizer"]["class_path"] == "torch.optim.Adam"

    out = subprocess.run([sys.executable, "-m", "lightning_mtl", "--version"], capture_output=True, text=True)
    import lightning_mtl

    assert out.returncode == 0 and lightning_mtl.__version__ in out.stdout


def test_wrong_config_key_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    config = yaml.safe_load((ROOT / "configs/quickstart.yaml").read_text())
    config["model"]["init_args"]["encoder"]["init_args"]["out_featurez"] = 64
    bad.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(bad)])
    assert exit_info.value.code != 0
    assert "out_featurez" in capsys.readouterr().err
