"""The command line: ``python -m lightning_mtl {fit,validate,test,predict} --config ...``.

A :class:`~lightning.pytorch.cli.LightningCLI` in subclass mode for model and data, so configs pick
any LightningModule / LightningDataModule by class path, or by short name for everything this
package exports (importing the package registers the names).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from jsonargparse import lazy_instance

import lightning_mtl  # noqa: F401  (registers every short class name)
from lightning_mtl import __version__
from lightning_mtl.callbacks import BestMetricsSummary


class LoggerSaveConfigCallback(SaveConfigCallback):
    """Saves the resolved config beside the run (overwriting, so re-runs into a folder work) and
    sends it to every W&B run as its config."""

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        config = self.parser.dump(self.config, skip_none=False, format="yaml")
        import yaml

        resolved = yaml.safe_load(config)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.config.update(resolved, allow_val_change=True)


class MultiTaskCLI(LightningCLI):
    """LightningCLI with the package's defaults: CSV logging, rich progress bar, best-metric summary,
    an optional test run after ``fit`` (``--test_after_fit true``), and ``--version``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_callback", LoggerSaveConfigCallback)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)
        trainer_defaults = {"logger": lazy_instance(CSVLogger, save_dir="runs")}
        trainer_defaults.update(kwargs.pop("trainer_defaults", None) or {})
        super().__init__(pl.LightningModule, pl.LightningDataModule, *args, trainer_defaults=trainer_defaults, **kwargs)

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        parser = super().init_parser(**kwargs)
        parser.add_argument("--version", action="version", version=f"lightning-mtl {__version__}")
        return parser

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(BestMetricsSummary, "best_metrics")
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="After `fit`, run `test` with the best checkpoint (or the last weights) and print its metrics.",
        )

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

    def after_fit(self) -> None:
        if not self.config[self.subcommand].get("test_after_fit"):
            return
        checkpoint = self.trainer.checkpoint_callback
        ckpt_path = "best" if checkpoint is not None and getattr(checkpoint, "best_model_path", "") else None
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt_path)


def main(args: list[str] | None = None) -> MultiTaskCLI:
    """Entry point of ``python -m lightning_mtl`` and of the ``lightning-mtl`` script."""
    return MultiTaskCLI(args=args)


__all__ = ["LoggerSaveConfigCallback", "MultiTaskCLI", "main"]
