"""The command line end to end: every shipped config, config handling, errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning_mtl.cli import main
from tests.config_matrix import CONTINUAL_METHODS, MIXUP_METHODS, SSL_METHODS, compose_family

ROOT = Path(__file__).resolve().parents[2]
# whole recipes on embedded data (the mixup generator models, the sharpness demos, the quickstart); those
# reading data from disk run on fixtures in their family's tests
STANDALONE = [ROOT / "configs/quickstart.yaml", *sorted((ROOT / "configs/sharpness").glob("*.yaml")),
              *sorted((ROOT / "configs/mixup").glob("*_digits.yaml"))]  # fmt: skip
# every method of the continual, SSL and mixup families on the embedded digits (the multi-task methods run
# on MultiDigits in tests/architectures/test_benchmark_configs.py)
COMPOSED = [("continual", m) for m in CONTINUAL_METHODS] + [("ssl", m) for m in [*SSL_METHODS, "linear_eval"]] + [
    ("mixup", m) for m in MIXUP_METHODS]  # fmt: skip
FAST = ["--trainer.fast_dev_run=true", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


@pytest.mark.parametrize("config", STANDALONE, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_standalone_recipe_runs_through_the_cli(config):
    cli = main(["fit", "--config", str(config), *FAST])
    assert cli.trainer.state.finished
    assert cli.trainer.global_step == 1


@pytest.mark.parametrize("family, method", COMPOSED, ids=[f"{f}/digits+{m}" for f, m in COMPOSED])
def test_every_family_method_runs_on_the_embedded_digits(family, method):
    cli = main(["fit", *compose_family(family, "digits", method), *FAST])
    assert cli.trainer.state.finished
    assert cli.trainer.global_step == 1


def test_configs_compose_and_a_fixed_version_is_never_written_twice(tmp_path):
    args = ["fit", "--config", str(ROOT / "configs/quickstart.yaml"), "--config", str(ROOT / "configs/loggers/csv.yaml"),
            "--trainer.max_steps=1", "--trainer.limit_val_batches=1", "--test_after_fit=false",
            "--trainer.enable_progress_bar=false", f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.logger.init_args.version=fixed"]  # fmt: skip
    cli = main(args)
    config = Path(cli.trainer.log_dir) / "config.yaml"
    saved = yaml.safe_load(config.read_text())
    assert saved["model"]["class_path"].endswith("MultiTaskModule")
    assert saved["trainer"]["max_steps"] == 1
    before = _snapshot(config.parent)
    with pytest.raises(RuntimeError, match="trainer.logger.init_args.version"):  # the folder is taken: refuse
        main(args)
    assert _snapshot(config.parent) == before


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


SHORT_FIT = ["--trainer.max_steps=2", "--trainer.limit_val_batches=1", "--test_after_fit=false",
             "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]  # fmt: skip
LOGGERS = {
    "csv": ["--config", str(ROOT / "configs/loggers/csv.yaml")],
    "wandb": ["--config", str(ROOT / "configs/loggers/wandb.yaml")],
    "none": ["--trainer.logger=false"],
}


@pytest.mark.slow
@pytest.mark.parametrize("logger", list(LOGGERS))
def test_two_runs_get_two_folders_and_the_first_is_untouched(tmp_path, monkeypatch, logger):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    args = ["fit", "--config", str(ROOT / "configs/quickstart.yaml"), *LOGGERS[logger], *SHORT_FIT]
    first = main(args)
    first_dir = Path(first.trainer.checkpoint_callback.dirpath).parent
    if logger == "wandb":
        first.trainer.logger.experiment.finish()
    before = _snapshot(first_dir)
    second = main(args)
    second_dir = Path(second.trainer.checkpoint_callback.dirpath).parent
    if logger == "wandb":
        second.trainer.logger.experiment.finish()
    assert first_dir.resolve() != second_dir.resolve()
    for run_dir in (first_dir, second_dir):
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["trainer"]["max_steps"] == 2
        assert list((run_dir / "checkpoints").glob("*.ckpt"))
    assert not list(Path.cwd().glob("*.yaml")) and not (Path.cwd() / "checkpoints").exists()
    assert _snapshot(first_dir) == before


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
    assert list(entries) == ["fit", "validate", "test", "predict", "report", "merge"]
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


def test_aggregator_short_names_take_init_args_like_class_paths(tmp_path):
    from lightning_mtl.aggregators import CAGrad
    from lightning_mtl.cli import MultiTaskCLI

    base = ["--config", str(ROOT / "configs/quickstart.yaml")]
    cli = MultiTaskCLI(args=[*base, "--model.init_args.aggregator=cagrad", "--model.init_args.aggregator.c=0.3"],
                       run=False)  # fmt: skip
    assert isinstance(cli.model.aggregator, CAGrad) and cli.model.aggregator.c == 0.3
    config = yaml.safe_load((ROOT / "configs/quickstart.yaml").read_text())
    config["model"]["init_args"]["aggregator"] = {"class_path": "cagrad", "init_args": {"c": 0.2}}
    (tmp_path / "short.yaml").write_text(yaml.safe_dump(config))
    cli = MultiTaskCLI(args=["--config", str(tmp_path / "short.yaml")], run=False)
    assert isinstance(cli.model.aggregator, CAGrad) and cli.model.aggregator.c == 0.2


def test_misspelled_aggregator_fails_when_parsed_naming_close_matches(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "configs/quickstart.yaml"), "--model.init_args.aggregator=pcgrd",
              "--print_config"])  # fmt: skip
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if "'pcgrd'" in line)
    assert "pcgrad" in line
    assert "Traceback" not in err and len(err[err.index("error:") :].splitlines()) < 25  # the usage, then a short error


def test_the_models_help_lists_every_aggregator_name_with_its_class(capsys):
    import re

    from lightning_mtl.aggregators import get_aggregator_class, list_aggregators

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--model", "MultiTaskModule", "--model.help", "MultiTaskModule"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    # the help of the aggregator argument alone (not the usage line), its wrapped lines joined
    entry = re.search(r"^  --model\.aggregator AGGREGATOR\b(.*?)^  --", out, re.MULTILINE | re.DOTALL).group(1)
    entry = " ".join(entry.split())
    listed = entry[entry.index("registered names: ") + len("registered names: ") : entry.rindex(")")]
    shown: dict[str, str] = {}
    for item in listed.split(", "):
        names, cls = re.fullmatch(r"(\S+) -> (\w+)", item).groups()
        for name in names.split("/"):
            shown[name] = cls
    assert "pcgrad -> PCGrad" in listed
    for name in list_aggregators():
        assert shown.get(name) == get_aggregator_class(name).__name__, name
    for name, cls in shown.items():  # the aliases listed are real and name the class they build
        assert get_aggregator_class(name).__name__ == cls, name
    assert len(shown) > len(list_aggregators())  # the aliases (ew, imtl, ...) are there too


@pytest.mark.slow
def test_sigterm_during_fit_saves_a_checkpoint_exits_143_and_the_run_resumes_from_it(tmp_path):
    """A cluster scheduler's SIGTERM: a checkpoint in the run folder, exit status 128 + SIGTERM, and the
    checkpoint resumes like any other."""
    import os
    import signal
    import time

    import torch

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}  # this checkout
    base = [sys.executable, "-m", "lightning_mtl", "fit", "--config", str(ROOT / "configs/quickstart.yaml"),
            "--test_after_fit=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            "--trainer.limit_val_batches=0", "--trainer.log_every_n_steps=1", "--data.init_args.batch_size=16",
            f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.logger.init_args.flush_logs_every_n_steps=1"]  # fmt: skip
    proc = subprocess.Popen([*base, "--trainer.max_epochs=50"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    metrics = tmp_path / "quickstart" / "version_0" / "metrics.csv"
    deadline = time.monotonic() + 120
    while not metrics.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert metrics.is_file(), proc.communicate(timeout=60)[0] if proc.poll() is not None else "training never started"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out
    checkpoints = tmp_path / "quickstart" / "version_0" / "checkpoints"
    saved = [p for p in checkpoints.iterdir() if p.suffix == ".ckpt"]
    assert len(saved) == 1 and not [p for p in checkpoints.iterdir() if p.suffix != ".ckpt"], saved  # no temp file left
    line = next(line for line in out.splitlines() if str(saved[0]) in line)
    assert "--ckpt_path" in line
    checkpoint = torch.load(saved[0], map_location="cpu", weights_only=True)
    step = checkpoint["global_step"]
    assert step >= 1
    resumed = subprocess.run([*base, "--ckpt_path", str(saved[0]), f"--trainer.max_steps={step + 1}"], env=env,
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    last = torch.load(tmp_path / "quickstart" / "version_1" / "checkpoints" / "last.ckpt", map_location="cpu",
                      weights_only=True)  # fmt: skip
    assert last["global_step"] == step + 1


@pytest.mark.parametrize("max_epochs", [1, 6])
def test_a_cosine_horizon_other_than_the_trainers_is_named_in_a_warning(tmp_path, max_epochs):
    import warnings

    t_max = yaml.safe_load((ROOT / "configs/quickstart.yaml").read_text())["model"]["init_args"]["lr_scheduler"][
        "init_args"
    ]["T_max"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(["fit", "--config", str(ROOT / "configs/quickstart.yaml"), f"--trainer.max_epochs={max_epochs}",
              "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=0", "--test_after_fit=false",
              "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
              f"--trainer.logger.init_args.save_dir={tmp_path}"])  # fmt: skip
    horizon = [str(w.message) for w in caught if "T_max" in str(w.message)]
    if max_epochs == t_max:
        assert horizon == []
    else:
        assert len(horizon) == 1, horizon
        assert f"T_max={t_max}" in horizon[0] and f"max_epochs={max_epochs}" in horizon[0]
        assert "model.init_args.lr_scheduler.init_args.T_max" in horizon[0]
