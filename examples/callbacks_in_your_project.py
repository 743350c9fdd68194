"""The library's callbacks in a Lightning project you already have: nothing in your module changes.

Here a plain single-task LightningModule on the embedded Digits data gets ``BestMetricsSummary``,
which keeps the best value of the monitored metric (in its checkpointed state) and writes it to the
W&B run summary when a ``WandbLogger`` is attached (to other loggers as ``best/<key>``). ``mode``
says that higher accuracy is better; a torchmetrics ``Metric`` logged with ``self.log`` would say so
itself.

    python examples/callbacks_in_your_project.py
"""

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from lightning_mtl.callbacks import BestMetricsSummary
from lightning_mtl.datamodules import Digits


class MyClassifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/acc", (self.net(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def main() -> None:
    best = BestMetricsSummary(monitor="val/acc", mode="max")
    model = MyClassifier()
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", logger=False, callbacks=[best], enable_checkpointing=False)
    trainer.fit(model, datamodule=Digits(as_dict=False, batch_size=64))
    print("best so far:", best.best)


if __name__ == "__main__":
    main()
