"""The command line: ``python -m lightning_mtl {fit,validate,test,predict} --config ...``, ``... report`` and ``... merge``.

A :class:`~lightning.pytorch.cli.LightningCLI` in subclass mode for model and data, so configs pick
any LightningModule / LightningDataModule by class path, or by short name for everything this
package exports (this module imports every family, :func:`lightning_mtl.import_families`, so that
jsonargparse finds the names; ``import lightning_mtl`` alone is lazy).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any, cast

import lightning.pytorch as pl
from jsonargparse import ArgumentParser, lazy_instance
from lightning.pytorch.callbacks import (
    BasePredictionWriter,
    Checkpoint,
    EarlyStopping,
    LearningRateMonitor,
    ModelCheckpoint,
    ProgressBar,
    RichProgressBar,
)
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_mtl import __version__, import_families
from lightning_mtl.callbacks import BestMetricsSummary, RunSummary, TaskPredictionWriter

import_families()  # before any parser exists: every short class name resolves as configs expect

DESCRIPTION = (
    "lightning-mtl: multi-task gradient aggregators, sharpness-aware training, mixup, self-supervised and "
    "continual learning as PyTorch Lightning plugins. Pick a module and a data module by class path or short "
    "name in a YAML config (--config, repeatable), override any key on the command line."
)
# the listing's one-line help per subcommand (Lightning's is the first line of the Trainer method's
# docstring, cut mid-sentence)
SUBCOMMAND_HELP = {
    "fit": "Train (and validate) the model; --test_after_fit true tests the best checkpoint afterwards.",
    "validate": "Run one pass over the validation set and log its metrics.",
    "test": "Run one pass over the test set (--ckpt_path picks the weights) and log its metrics.",
    "predict": "Predict on the data module's predict set and write predictions.pt into the run folder.",
    "report": "Compare finished runs: per-task metrics and Delta m % as Markdown, CSV and a chart.",
    "merge": "Merge expert checkpoints fine-tuned from one base (task arithmetic, TIES, averaging) into one checkpoint.",
}


class LoggerSaveConfigCallback(SaveConfigCallback):
    """Gives every run a folder of its own, saves the resolved config there (never over an earlier
    run's), points the checkpoints there, and sends the config to every W&B run as its config.

    The run folder is the logger's versioned folder (``<save_dir>/<name>/version_<n>`` for CSV and
    TensorBoard, ``<save_dir>/<project>/<run id>`` for W&B), and ``runs/lightning_logs/version_<n>``
    without a logger; a new ``version_<n>`` is claimed with an atomic ``mkdir``, so concurrent runs
    never share one. A fixed logger version whose folder already holds a run is refused."""

    run_dir: str | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        claimed = _claim_run_dir(trainer) if trainer.is_global_zero else None
        # rank zero's claim (never None there) reaches every rank
        run_dir, error = cast("tuple[str, str | None]", trainer.strategy.broadcast(claimed))
        if error:
            raise RuntimeError(error)
        self.run_dir = run_dir
        for checkpoint in trainer.checkpoint_callbacks:
            if getattr(checkpoint, "dirpath", "") is None:  # not chosen by the user
                checkpoint.dirpath = os.path.join(run_dir, "checkpoints")  # type: ignore[attr-defined]  # has one (getattr above)
        if not trainer.loggers:
            trainer._default_root_dir = run_dir  # type: ignore[attr-defined]  # set by Lightning's connector; so trainer.log_dir is the run folder too
        if trainer.is_global_zero:
            self.parser.save(self.config, os.path.join(run_dir, self.config_filename), skip_none=False,
                             multifile=self.multifile)  # fmt: skip
            self.save_config(trainer, pl_module, stage)
        self.already_saved = True

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        config = self.parser.dump(self.config, skip_none=False, format="yaml")
        import yaml

        resolved = yaml.safe_load(config)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.config.update(resolved, allow_val_change=True)


def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model.aggregator": "ls", "model.optimizer": "torch.optim.Adam", "model.optimizer.lr": 0.002, ...}``:
    one key per leaf, a class's path under its own key and its arguments below it (``init_args`` left out)."""
    out: dict[str, Any] = {}
    if "class_path" in config:
        out[prefix] = config["class_path"]
        for key in ("init_args", "dict_kwargs"):
            out.update(flat_config(config.get(key) or {}, prefix))
        return out
    for key, value in config.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        out.update(flat_config(value, name) if isinstance(value, dict) else {name: value})
    return out


class ConfigHyperparameters(pl.Callback):
    """Logs the flat resolved config as hyper-parameters (TensorBoard's HParams tab, CSV's ``hparams.yaml``)
    once per run, after Lightning logged the module's own; TensorBoard also gets the main metrics, to pair
    them with each run (their initial value is NaN: no fake point on the curves). W&B gets the nested config
    from :class:`LoggerSaveConfigCallback` instead."""

    def __init__(self, params: dict[str, Any], metrics: list[str]) -> None:
        self.params = params
        self.metrics = metrics
        self._logged = False

    def _log(self, trainer: pl.Trainer) -> None:
        if self._logged or not trainer.is_global_zero:
            return
        self._logged = True
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.log_hyperparams(self.params, metrics={key: float("nan") for key in self.metrics})
            elif not isinstance(logger, WandbLogger):
                logger.log_hyperparams(self.params)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log(trainer)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log(trainer)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log(trainer)


class SigtermCheckpoint(pl.Callback):
    """On SIGTERM during ``fit`` (a cluster scheduler's pre-emption or time limit), saves a checkpoint into
    the run's checkpoints folder and says how to resume; :class:`MultiTaskCLI` then exits with status 143
    (128 + SIGTERM) instead of Lightning's 0, which schedulers read as success.

    The checkpoint is ``last.ckpt`` of a ``ModelCheckpoint(save_last=...)`` when the run has one (it is the
    last state), else ``sigterm.ckpt``; it is written under a temporary name and renamed, so a second signal
    or a crash mid-write never leaves a truncated file where a good checkpoint was."""

    ckpt_path: str | None = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != "fit":
            return
        path = self._path(trainer)
        partial = f"{path}.partial"
        trainer.save_checkpoint(partial)
        if trainer.is_global_zero:
            os.replace(partial, path)
            print(f"Stopped by SIGTERM: saved {path}; resume with the same command and --ckpt_path {path}",
                  flush=True)  # fmt: skip
        self.ckpt_path = path

    @staticmethod
    def _path(trainer: pl.Trainer) -> str:
        for checkpoint in trainer.checkpoint_callbacks:
            if isinstance(checkpoint, ModelCheckpoint) and checkpoint.save_last and checkpoint.dirpath:
                candidates = checkpoint._monitor_candidates(trainer)
                return checkpoint.format_checkpoint_name(candidates, checkpoint.CHECKPOINT_NAME_LAST)
        claimed = [c.run_dir for c in trainer.callbacks if isinstance(c, LoggerSaveConfigCallback) and c.run_dir]  # type: ignore[attr-defined]  # Lightning's callback connector sets it
        run_dir = claimed[0] if claimed else (trainer.log_dir or trainer.default_root_dir)
        return os.path.join(run_dir, "checkpoints", "sigterm.ckpt")


def _claim_run_dir(trainer: pl.Trainer) -> tuple[str, str | None]:
    """This run's folder (created) and, when it already holds an earlier run, the error to raise."""
    if not trainer.loggers:
        return _claim_version(os.path.join(trainer.default_root_dir, "runs", "lightning_logs")), None
    logger = trainer.loggers[0]
    if isinstance(logger, (CSVLogger, TensorBoardLogger)) and logger._version is None:
        # claim the next free version_<n> ourselves: the logger's own pick lists the folder, which
        # two runs starting together can both read before either writes
        run_dir = _claim_version(logger.root_dir)
        logger._version = int(os.path.basename(run_dir).removeprefix("version_"))
        return run_dir, None
    logger.experiment  # type: ignore[attr-defined]  # noqa: B018  (every Lightning logger has one, the base class does not declare it; W&B and the like choose their run id when the run starts)
    run_dir = _fixed_run_dir(trainer, logger)
    error = _taken(run_dir)
    if error is None:
        os.makedirs(run_dir, exist_ok=True)
    return run_dir, error


def _fixed_run_dir(trainer: pl.Trainer, logger: Any) -> str:
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    return os.path.join(logger.save_dir or trainer.default_root_dir, str(logger.name), version)


def _taken(run_dir: str) -> str | None:
    """The error to raise when ``run_dir`` already holds a run (its config or checkpoints)."""
    checkpoints = os.path.join(run_dir, "checkpoints")
    if os.path.isfile(os.path.join(run_dir, "config.yaml")) or (os.path.isdir(checkpoints) and os.listdir(checkpoints)):
        return (
            f"{run_dir} already holds an earlier run, which this run would overwrite: give the logger a new "
            "version (trainer.logger.init_args.version, or a new W&B id) or leave it unset for a fresh folder"
        )
    return None


def _claim_version(root: str) -> str:
    """Create ``root/version_<n>`` for the first free n (``mkdir`` fails on a taken name, atomically)."""
    os.makedirs(root, exist_ok=True)
    taken = [int(d.removeprefix("version_")) for d in os.listdir(root) if d.removeprefix("version_").isdigit()]
    n = max(taken, default=-1) + 1
    while True:
        try:
            os.mkdir(os.path.join(root, f"version_{n}"))
            return os.path.join(root, f"version_{n}")
        except FileExistsError:
            n += 1


class MultiTaskCLI(LightningCLI):
    """LightningCLI with the package's defaults: CSV logging, rich progress bar, best-metric summary,
    an optional test run after ``fit`` (``--test_after_fit true``), and ``--version``; every run also
    gets a :class:`~lightning_mtl.callbacks.RunSummary`, the flat config as hyper-parameters, a
    ``LearningRateMonitor`` when it logs, ``predict`` a
    :class:`~lightning_mtl.callbacks.TaskPredictionWriter`, and ``fit`` a :class:`SigtermCheckpoint`:
    a run stopped by SIGTERM leaves a checkpoint and exits with status 143."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_callback", LoggerSaveConfigCallback)
        kwargs.setdefault("auto_configure_optimizers", False)
        trainer_defaults = {"logger": lazy_instance(CSVLogger, save_dir="runs")}
        trainer_defaults.update(kwargs.pop("trainer_defaults", None) or {})
        super().__init__(pl.LightningModule, pl.LightningDataModule, *args, trainer_defaults=trainer_defaults, **kwargs)  # type: ignore[misc]  # mypy cannot rule out *args reaching trainer_defaults

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        parser = super().init_parser(**kwargs)
        parser.add_argument("--version", action="version", version=f"lightning-mtl {__version__}")
        return parser

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        argv = sys.argv[1:] if args is None else args
        given = _with_checkpoint_config(argv)
        if given is argv:
            super().parse_arguments(parser, args)
        else:  # the command line with the checkpoint's model and data in front (no "args and argv" warning)
            self.config = parser.parse_args(given)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(BestMetricsSummary, "best_metrics")
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="After `fit`, run `test` with the best checkpoint (or the last weights) and print its metrics.",
        )

    def _setup_parser_kwargs(self, parser_kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        main_kwargs, subparser_kwargs = super()._setup_parser_kwargs(parser_kwargs)
        main_kwargs.setdefault("prog", "lightning-mtl")
        main_kwargs.setdefault("description", DESCRIPTION)
        for name in self.subcommands():
            subparser_kwargs.setdefault(name, {}).setdefault("description", SUBCOMMAND_HELP[name])
        return main_kwargs, subparser_kwargs

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        super()._add_subcommands(parser, **kwargs)
        action = parser._subcommands_action
        assert action is not None  # super()._add_subcommands has just added the subcommands
        for choice in action._choices_actions:
            choice.help = SUBCOMMAND_HELP.get(choice.dest, choice.help)
        # listed only: `main` hands `report ...` and `merge ...` to their modules before this parser sees them
        action.add_subcommand("report", ArgumentParser(add_help=False), help=SUBCOMMAND_HELP["report"])
        action.add_subcommand("merge", ArgumentParser(add_help=False), help=SUBCOMMAND_HELP["merge"])

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        self._add_default_callbacks(trainer)
        return trainer

    def _add_default_callbacks(self, trainer: pl.Trainer) -> None:
        """The run summary, the config as hyper-parameters, the learning rate and the prediction writer,
        each unless the run brings its own; inserted before the checkpoint callbacks, which Lightning runs last."""
        import yaml

        config = self.config.get(str(self.subcommand), self.config)
        resolved = yaml.safe_load(self._parser(self.subcommand).dump(config, skip_none=True, format="yaml")) or {}
        params = flat_config(resolved)
        params.pop("config", None)  # the paths of the config files, not a fact of the run
        present = trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning's callback connector
        monitors = [
            c.monitor  # type: ignore[union-attr]  # the base Checkpoint declares no monitor; the filter reads it by getattr
            for c in present
            if isinstance(c, (Checkpoint, EarlyStopping)) and getattr(c, "monitor", None)
        ]
        extra: list[pl.Callback] = [ConfigHyperparameters(params, list(dict.fromkeys(monitors)) or ["val/loss"])]
        if not any(isinstance(c, RunSummary) for c in present):
            extra.append(RunSummary(config={"subcommand": self.subcommand, **params}))
        if trainer.loggers and not any(isinstance(c, LearningRateMonitor) for c in present):
            extra.append(LearningRateMonitor())
        if self.subcommand == "predict" and not any(isinstance(c, BasePredictionWriter) for c in present):
            extra.append(TaskPredictionWriter())
        if self.subcommand == "fit" and not any(isinstance(c, SigtermCheckpoint) for c in present):
            extra.append(SigtermCheckpoint())
        at = next((i for i, c in enumerate(present) if isinstance(c, Checkpoint)), len(present))
        present[at:at] = extra

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> pl.Trainer:
        # The rich progress bar is the default, but only when the run wants a bar and has none of its
        # own (a bar in `trainer.defaults` would clash with `enable_progress_bar: false`).
        own = config.get("callbacks") or []
        own = own if isinstance(own, list) else [own]
        if config.get("enable_progress_bar", True) is not False and not any(
            isinstance(c, ProgressBar) for c in [*own, *callbacks]
        ):
            callbacks = [*callbacks, RichProgressBar()]
        return super()._instantiate_trainer(config, callbacks)

    def _run_subcommand(self, subcommand: str) -> None:
        # A CSV or TensorBoard logger with a fixed version starts its experiment before any callback runs,
        # and starting it deletes the metrics.csv in its folder: refuse a taken folder before the Trainer runs
        logger = self.trainer.logger
        if isinstance(logger, (CSVLogger, TensorBoardLogger)) and logger._version is not None:
            error = _taken(_fixed_run_dir(self.trainer, logger))
            if error:
                raise RuntimeError(error)
        try:
            super()._run_subcommand(subcommand)
        except SIGTERMException:
            # Lightning stops gracefully and exits 0; by now the loggers are finalised (and a `fit`
            # checkpoint saved), so leave with 128 + SIGTERM as a killed job would
            sys.exit(128 + signal.SIGTERM)

    def after_fit(self) -> None:
        if not self.config[self.subcommand].get("test_after_fit"):
            return
        checkpoint = self.trainer.checkpoint_callback
        ckpt_path = "best" if checkpoint is not None and bool(getattr(checkpoint, "best_model_path", "")) else None
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt_path)


def _with_checkpoint_config(args: Any) -> Any:
    """``test --ckpt_path X`` needs no config: the model and data written into a CLI run's checkpoint
    (class paths and init args) come first, so that a config or flags given too still override them."""
    if not isinstance(args, list) or not args or args[0] not in ("validate", "test", "predict"):
        return args
    flags = [a.split("=", 1)[0] for a in args]
    if "--ckpt_path" not in flags:
        return args
    i = flags.index("--ckpt_path")
    path = args[i].split("=", 1)[1] if "=" in args[i] else (args[i + 1] if i + 1 < len(args) else "")
    if not os.path.isfile(path):
        return args
    import torch

    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # only its hparams are read
    given = []
    for key, group in (("model", "hyper_parameters"), ("data", "datamodule_hyper_parameters")):
        hparams = dict(checkpoint.get(group) or {})
        hparams.pop("_instantiator", None)
        if "_class_path" in hparams:  # written by the CLI (Lightning's instantiator)
            config = {"class_path": hparams.pop("_class_path"), "init_args": hparams}
            given += [f"--{key}", json.dumps(config)]
    return [args[0], *given, *args[1:]]


def main(args: list[str] | None = None, prog: str = "lightning-mtl") -> Any:
    """Entry point of ``python -m lightning_mtl`` and of the ``lightning-mtl`` script: ``report ...`` goes to
    :func:`lightning_mtl.report.main` (returns the written paths), ``merge ...`` to
    :func:`lightning_mtl.merging.command.main` (returns its summary), anything else to :class:`MultiTaskCLI`."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["report"]:
        from lightning_mtl.report import main as report_main

        return report_main(argv[1:], prog=f"{prog} report")
    if argv[:1] == ["merge"]:
        from lightning_mtl.merging.command import main as merge_main

        return merge_main(argv[1:], prog=f"{prog} merge")
    return MultiTaskCLI(args=args, parser_kwargs={"prog": prog})


__all__ = [
    "ConfigHyperparameters",
    "LoggerSaveConfigCallback",
    "MultiTaskCLI",
    "SigtermCheckpoint",
    "flat_config",
    "main",
]
