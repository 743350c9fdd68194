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


def test_predict_writes_per_task_predictions_and_their_indices(tmp_path):
    import torch

    batch_size, batches = 16, 2
    cli = main(["predict", "--config", str(ROOT / "configs/quickstart.yaml"), f"--trainer.limit_predict_batches={batches}",
                f"--data.init_args.batch_size={batch_size}", f"--trainer.logger.init_args.save_dir={tmp_path}",
                "--trainer.enable_progress_bar=false"])  # fmt: skip
    saved = torch.load(Path(cli.trainer.log_dir) / "predictions.pt")
    assert set(saved["predictions"]) == set(cli.model.task_names)
    for out in saved["predictions"].values():
        assert out.shape[0] == batch_size * batches
    indices = saved["indices"]
    assert indices.tolist() == list(range(batch_size * batches))  # the predict loader does not shuffle
    # the rows are the model's outputs on the samples the indices name
    dataset = cli.datamodule.predict_dataloader().dataset
    inputs = torch.stack([dataset[int(i)][0] for i in indices[-5:]])
    cli.model.eval()
    with torch.no_grad():
        expected = cli.model(inputs)
    for task in cli.model.task_names:
        torch.testing.assert_close(saved["predictions"][task][-5:], expected[task])


def _subcommand_help(text: str) -> dict[str, str]:
    """``{name: help}`` from the subcommand listing of a --help text (continuation lines joined)."""
    import re

    entries: dict[str, str] = {}
    last = None
    for line in text.split("Available subcommands:")[1].splitlines():
        match = re.match(r"^    (\w+)\s+(\S.*)$", line)
        if match:
            last = match.group(1)
            entries[last] = match.group(2).strip()
        elif last and line.startswith(" " * 10) and line.strip():
            entries[last] += " " + line.strip()
    return entries


def test_help_names_the_program_describes_the_library_and_lists_every_subcommand_whole(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert out.startswith("usage: lightning-mtl ")
    assert "Lightning Trainer command line tool" not in out and "multi-task" in out
    entries = _subcommand_help(out)
    assert list(entries) == ["fit", "validate", "test", "predict", "report"]
    for name, text in entries.items():
        assert text.endswith("."), (name, text)  # whole sentences, not cut at the first line of a docstring
    assert "%%" not in out
    with pytest.raises(SystemExit):
        main(["report", "--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: lightning-mtl report ") and "Delta m %" in out and "%%" not in out
    import os

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}  # this checkout
    done = subprocess.run([sys.executable, "-m", "lightning_mtl", "--help"], capture_output=True, text=True, timeout=300,
                          env=env)  # fmt: skip
    assert done.returncode == 0 and done.stdout.startswith("usage: python -m lightning_mtl ")


def test_the_console_script_entry_runs_the_report(tmp_path):
    """`lightning-mtl report ...` (pyproject's script, lightning_mtl.cli:main) works like `python -m lightning_mtl report`."""
    import tomllib

    script = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["lightning-mtl"]
    assert script == "lightning_mtl.cli:main"
    run = tmp_path / "run" / "version_0"
    run.mkdir(parents=True)
    (run / "metrics.csv").write_text("test/left/acc,test/right/acc\n0.5,0.75\n")
    paths = main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "report")])
    assert "| run/version_0 | multi-task | test | 0.5000 | 0.7500 |" in paths["md"].read_text()
