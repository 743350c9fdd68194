"""A text classifier tuned through a ``peft`` adapter, with cross-entropy + weight x SupCon and embedding mixup."""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_mtl._distributed import distributed_rank, distributed_world_size, gather_rows, gather_rows_with_grad
from lightning_mtl._hparams import save_init_hyperparameters
from lightning_mtl.architectures import TransformersEncoder
from lightning_mtl.finetuning.adapters import create_adapter
from lightning_mtl.finetuning.supcon import supervised_contrastive_loss
from lightning_mtl.mixup import Mixup, mix_targets, soft_target_cross_entropy

# the registered adapters live in their own files: importing them registers them
from lightning_mtl.finetuning import lora as _lora  # noqa: F401  # isort: skip
from lightning_mtl.finetuning import prefix_tuning as _prefix  # noqa: F401  # isort: skip

__all__ = ["PEFTClassifier"]


class PEFTClassifier(pl.LightningModule):
    """A frozen ``transformers`` encoder with a ``peft`` adapter (LoRA or prefix tuning) and a linear head,
    trained with cross-entropy plus, optionally, a weighted supervised contrastive term and mixup of the
    pooled embeddings.

    Obadinma, Guo and Zhu, "Effectiveness of Data Augmentation for Parameter Efficient Tuning with Limited
    Data", RepL4NLP 2023: LoRA / P-tuning v2 on a few labelled sentences and their augmentations, with
    ``L = CE + supcon_weight * SupCon`` on the sentence embeddings (here the encoder's pooled output, the
    one the head reads) to separate the classes of augmented data; mixup of sentence embeddings (Guo, Mao
    and Zhang, 2019) reuses :class:`~lightning_mtl.mixup.Mixup`: one ``lam ~ Beta(alpha, alpha)`` per batch,
    embeddings and one-hot labels mixed alike, soft-target cross-entropy. SupCon always sees the unmixed
    embeddings; the original and augmented copies of a sentence are positives of each other and of every
    other sentence of their class (:func:`~lightning_mtl.finetuning.supervised_contrastive_loss`).

    Only the adapter and the head are trainable, and only they are written to checkpoints: the encoder is
    rebuilt from ``path`` / ``config`` (a config encoder's random weights are seeded by ``model_seed``), so
    ``PEFTClassifier.load_from_checkpoint(file)`` puts the tuned adapter back on the base model.

    Under DDP the cross-entropy is each rank's mean (DDP averages the gradients) and the SupCon term is
    computed on the embeddings of all ranks, gathered with their gradients: the update equals the
    single-process update on the concatenated batch when ranks hold equally many samples. Mixup pairs
    samples of the rank's own batch. Dropout and mixup draw from a generator seeded by ``model_seed``, the
    epoch, the batch index and the rank, so a resumed run repeats an uninterrupted one bit for bit.

    Logged: ``train/loss``, ``train/ce``, ``train/supcon``; ``val/loss``, ``val/accuracy`` (and ``test/...``).

    Args:
        num_classes: classes of the head.
        adapter: a registered adapter (:func:`~lightning_mtl.finetuning.list_adapters`: ``"lora"``,
            ``"prefix"``).
        adapter_kwargs: its arguments (``r``, ``num_virtual_tokens``, ...).
        path: local folder of a ``transformers`` encoder (nothing is downloaded).
        config: instead: config dict of a randomly initialised one (``model_type`` and sizes).
        pooling: ``"cls"`` or ``"mean"`` pooling of the last hidden states (the embedding).
        model_seed: seed of a config encoder's weights, of the adapter's and of the head's initialization.
        supcon_weight: weight of the SupCon term (0 = cross-entropy only).
        supcon_temperature: SupCon's ``tau``.
        mixup_alpha: Beta parameter of embedding mixup (None = no mixup).
        optimizer: optimizer factory (default AdamW, lr 1e-3, weight decay 0.01, on the trainable parameters).
        lr_scheduler: optional LR scheduler factory.
    """

    def __init__(
        self,
        num_classes: int,
        adapter: str = "lora",
        adapter_kwargs: dict[str, Any] | None = None,
        path: str | None = None,
        config: dict[str, Any] | None = None,
        pooling: Literal["cls", "mean"] = "cls",
        model_seed: int = 0,
        supcon_weight: float = 0.0,
        supcon_temperature: float = 0.1,
        mixup_alpha: float | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if supcon_weight < 0:
            raise ValueError(f"supcon_weight must be >= 0, got {supcon_weight}")
        save_init_hyperparameters(self, ["optimizer", "lr_scheduler"], logger=False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(model_seed)
            self.encoder = TransformersEncoder(path=path, config=config, pooling=pooling)
            self.encoder.model = create_adapter(adapter, self.encoder.model, **(adapter_kwargs or {}))
            self.head = nn.Linear(self.encoder.out_features, num_classes)
        self.num_classes = int(num_classes)
        self.model_seed = int(model_seed)
        self.supcon_weight = float(supcon_weight)
        self.supcon_temperature = float(supcon_temperature)
        self.mixup = None if mixup_alpha is None else Mixup(alpha=mixup_alpha)
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        # what a checkpoint holds: the adapter and the head (peft froze everything else)
        self.metric_directions: dict[str, bool] = {"val/loss": False, "val/accuracy": True}
        self.saved_keys = frozenset(name for name, p in self.named_parameters() if p.requires_grad)

    # -- forward ---------------------------------------------------------------------------------
    def embed(self, input_ids: Tensor) -> Tensor:
        """The pooled sentence embeddings ``[B, hidden]`` (what the head and SupCon see)."""
        return self.encoder(input_ids)

    def forward(self, input_ids: Tensor) -> Tensor:
        """Class logits ``[B, num_classes]``."""
        return self.head(self.embed(input_ids))

    def losses(self, embeddings: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """``ce``, ``supcon`` and their weighted sum ``loss`` for a batch's embeddings."""
        if self.mixup is not None and len(embeddings) > 1:
            # the image mix works on [B, C, H, W]: an embedding is a 1 x 1 image with `hidden` channels
            mixed = self.mixup.mix(embeddings[:, :, None, None])
            targets = mix_targets(labels, mixed, self.num_classes)
            ce = soft_target_cross_entropy(self.head(mixed.inputs.flatten(1)).float(), targets)
        else:
            ce = F.cross_entropy(self.head(embeddings).float(), labels)
        out = {"ce": ce, "loss": ce}
        if self.supcon_weight:
            if distributed_world_size() > 1:  # the positives and negatives of every rank
                embeddings, labels = gather_rows_with_grad(embeddings), gather_rows(labels)
            out["supcon"] = supervised_contrastive_loss(embeddings, labels, self.supcon_temperature)
            out["loss"] = ce + self.supcon_weight * out["supcon"]
        return out

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        # dropout and mixup draw from a generator keyed by the step, not from the global one, whose state
        # checkpoints do not hold: a resumed run repeats the uninterrupted one bit for bit (ints hash alike
        # in every process)
        key = hash((self.model_seed, self.current_epoch, batch_idx, distributed_rank())) & (2**63 - 1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(key)
            losses = self.losses(self.embed(batch["input_ids"]), batch["labels"])
        size = len(batch["labels"])
        for name, value in losses.items():
            self.log(f"train/{name}", value.detach(), prog_bar=name == "loss", batch_size=size)
        return losses["loss"]

    def _evaluate(self, batch: dict[str, Tensor], stage: str) -> None:
        logits = self(batch["input_ids"]).float()
        size = len(batch["labels"])
        self.log(f"{stage}/loss", F.cross_entropy(logits, batch["labels"]), batch_size=size, sync_dist=True)
        accuracy = (logits.argmax(-1) == batch["labels"]).float().mean()
        self.log(f"{stage}/accuracy", accuracy, prog_bar=True, batch_size=size, sync_dist=True)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer: torch.optim.Optimizer
        if self.optimizer_factory is None:
            optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
        else:
            optimizer = self.optimizer_factory(params)
        if self.lr_scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.lr_scheduler_factory(optimizer)}

    # -- checkpoints: the frozen encoder stays out --------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k not in self.saved_keys]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        for key, value in self.state_dict().items():
            state.setdefault(key, value)
