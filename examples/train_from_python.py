"""Train a two-task model from Python instead of YAML, with the library's pieces in your own Trainer.

python examples/train_from_python.py
"""

import lightning.pytorch as pl
import torch

from lightning_mtl import BestMetricsSummary, ClassificationTask, DigitsCNN, MultiDigits, MultiTaskModule


def main() -> None:
    pl.seed_everything(0)
    model = MultiTaskModule(
        encoder=DigitsCNN(),
        tasks={"left": ClassificationTask(num_classes=10), "right": ClassificationTask(num_classes=10)},
        optimizer=lambda params: torch.optim.Adam(params, lr=2e-3),
        baselines={"left": {"acc": 0.95}, "right": {"acc": 0.95}},  # single-task results, for val/delta_m
    )
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, callbacks=[BestMetricsSummary()])
    data = MultiDigits(num_train=5000)
    trainer.fit(model, datamodule=data)
    print({k: round(float(v), 4) for k, v in trainer.callback_metrics.items() if k.startswith("val/")})


if __name__ == "__main__":
    main()
