"""SAM in a Lightning project you already have: add one callback, change nothing in your module.

A plain single-task classifier on the embedded Digits data (the 8x8 handwritten digits that
scikit-learn ships; nothing is downloaded) trains with ``SharpnessAwareMinimization``. Logs, metrics,
BatchNorm statistics, gradient clipping, the LR scheduler and checkpoints behave as without it; each
step costs a second forward and backward pass.

    python examples/sam_callback.py                 # SAM, rho = 0.05
    python examples/sam_callback.py --adaptive      # ASAM, rho = 0.5
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_mtl.datamodules import Digits
from lightning_mtl.sharpness import SharpnessAwareMinimization


class MyClassifier(pl.LightningModule):
    """Your module, as it was: nothing here knows about SAM."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(16 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10),
        )  # fmt: skip
        self.train_acc = MulticlassAccuracy(num_classes=10)
        self.val_acc = MulticlassAccuracy(num_classes=10)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        loss = F.cross_entropy(logits, y)
        self.train_acc(logits, y)
        self.log_dict({"train/loss": loss, "train/acc": self.train_acc}, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.val_acc(self.net(x), y)
        self.log("val/acc", self.val_acc, on_epoch=True)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.trainer.max_epochs)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


def main(argv: list[str] | None = None) -> pl.Trainer:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adaptive", action="store_true", help="ASAM instead of SAM")
    parser.add_argument("--rho", type=float, default=None, help="radius (default 0.05 SAM, 0.5 ASAM)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--limit-train-batches", type=float, default=1.0)
    args = parser.parse_args(argv)

    pl.seed_everything(0)
    sam = SharpnessAwareMinimization(rho=args.rho, adaptive=args.adaptive)
    trainer = pl.Trainer(
        max_epochs=args.epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, limit_train_batches=args.limit_train_batches, callbacks=[sam],
    )  # fmt: skip
    trainer.fit(MyClassifier(), datamodule=Digits(as_dict=False, batch_size=64))
    print(f"{'ASAM' if sam.adaptive else 'SAM'} steps: {sam.steps}, rho {sam.last_rho}, "
          f"val/acc {float(trainer.callback_metrics['val/acc']):.3f}")  # fmt: skip
    return trainer


if __name__ == "__main__":
    main()
