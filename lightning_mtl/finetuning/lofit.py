"""LoFiT: localized fine-tuning of a frozen decoder through per-head scales and offsets."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_mtl._hparams import save_init_hyperparameters
from lightning_mtl.finetuning.hf_models import build_causal_lm
from lightning_mtl.finetuning.intervention import LoFiTIntervention, find_attention_projections
from lightning_mtl.finetuning.losses import answer_token_accuracy, dpo_loss, sequence_log_probs, sft_loss

__all__ = ["LoFiT"]

# the official scripts' learning rates (Llama-2-7B, TruthfulQA): 5e-3 for A, 1e-2 for v; no weight decay
_DEFAULT_LR = {"localize": 5e-3, "tune": 1e-2}


def _read_heads(heads: str | Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    if isinstance(heads, (str, os.PathLike)):
        return [(int(layer), int(head)) for layer, head in LoFiTIntervention.read(heads)["heads"].tolist()]
    return [(int(layer), int(head)) for layer, head in heads]


class LoFiT(pl.LightningModule):
    """LoFiT: learn a scale and an offset on a few attention heads' outputs of a frozen decoder.

    Yin, Ye and Durrett, "LoFiT: Localized Fine-tuning on LLM Representations", NeurIPS 2024
    (official code: github.com/fc2869/lo-fit). Every head ``(l, i)`` of every layer gets
    ``z' = (1 + A_{l,i}) * z + v_{l,i}`` before the attention's output projection
    (:class:`LoFiTIntervention`, hooks on any Hugging Face decoder); the decoder itself never changes.

    * ``stage="localize"``: train only ``A`` (init ``N(0, init_std^2)``, all heads) with the task loss plus
      ``l1_lambda * sum |A|``; at the end the heads ranked by ``||A_{l,i}||_2`` (top ``top_k``) are saved to
      ``save_path``.
    * ``stage="tune"``: a fresh intervention, ``A`` zero and frozen (as the official code), train only ``v``
      (init ``N(0, init_std^2)``) on the first ``top_k`` of ``heads`` (the file of stage 1); the other
      heads are untouched. At the end the intervention is saved to ``save_path``
      (:func:`~lightning_mtl.finetuning.load_intervention` installs it on the base model).

    Losses: ``"sft"``, cross-entropy on the chosen answers' tokens; ``"dpo"``, direct preference optimization
    against the base model (the intervention switched off), ``beta = 0.5`` as the official TruthfulQA runs.
    Batches are those of :class:`~lightning_mtl.finetuning.PreferencePairs`.

    Logged: ``train/loss`` (task loss + L1), ``train/l1``; ``val/loss`` and ``val/accuracy`` (answer tokens,
    SFT) or ``val/reward_accuracy`` (chosen preferred, DPO).

    Under DDP each rank averages its own loss (SFT: over its answer tokens) and DDP averages the gradients:
    the single-process update on the concatenated batch when ranks hold equally many answer tokens. The
    frozen decoder is left out of checkpoints (it is rebuilt from ``path`` / ``config``); the intervention,
    the optimizer and the loops are in them.

    Args:
        path: local folder of a ``transformers`` causal LM.
        config: instead: config dict of a randomly initialised one (seeded by ``model_seed``).
        model: instead: the decoder itself (from Python).
        stage: ``"localize"`` (train ``A``) or ``"tune"`` (train ``v`` on the selected heads).
        loss: ``"sft"`` or ``"dpo"``.
        top_k: localize: heads to save (default 10% of all heads, as the official code); tune: how many of
            ``heads`` to use (default all).
        heads: tune: the file saved by stage 1, or ``(layer, head)`` pairs in order of importance.
        save_path: where to write the ranked heads (localize) or the trained intervention (tune).
        l1_lambda: weight of ``sum |trained parameter|`` (default 5e-4 when localizing, as for Llama-2-7B;
            0 when tuning).
        dpo_beta: DPO temperature.
        init_std: standard deviation of the trained parameter's initialization.
        model_seed: seed of a ``config`` model's random weights.
        optimizer: optimizer factory (default AdamW without weight decay, lr 5e-3 localize / 1e-2 tune).
        lr_scheduler: optional LR scheduler factory (stepped per epoch).
    """

    def __init__(
        self,
        path: str | None = None,
        config: dict[str, Any] | None = None,
        model: nn.Module | None = None,
        stage: Literal["localize", "tune"] = "localize",
        loss: Literal["sft", "dpo"] = "sft",
        top_k: int | None = None,
        heads: str | list[list[int]] | None = None,
        save_path: str | None = None,
        l1_lambda: float | None = None,
        dpo_beta: float = 0.5,
        init_std: float = 1e-3,
        model_seed: int = 0,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        if stage not in ("localize", "tune"):
            raise ValueError(f"stage must be 'localize' or 'tune', got {stage!r}")
        if loss not in ("sft", "dpo"):
            raise ValueError(f"loss must be 'sft' or 'dpo', got {loss!r}")
        if stage == "tune" and heads is None:
            raise ValueError("stage 'tune' needs `heads`: the file saved by stage 'localize' or (layer, head) pairs")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        save_init_hyperparameters(self, ["model", "optimizer", "lr_scheduler"], logger=False)
        if model is None:
            model = build_causal_lm(path, config, model_seed)
        elif path is not None or config is not None:
            raise ValueError("give one of `model`, `path` or `config`")
        layout = find_attention_projections(model)
        self.model = model.requires_grad_(False)
        self.intervention = LoFiTIntervention(layout.num_layers, layout.num_heads, layout.head_dim)
        self.stage = stage
        self.loss_name = loss
        self.l1_lambda = float(l1_lambda if l1_lambda is not None else (5e-4 if stage == "localize" else 0.0))
        self.dpo_beta = float(dpo_beta)
        self.save_path = save_path
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        total = layout.num_layers * layout.num_heads
        with torch.no_grad():
            if stage == "localize":
                self.top_k = min(top_k or max(1, math.ceil(0.1 * total)), total)
                self.intervention.scale.normal_(0.0, init_std)
            else:
                chosen = _read_heads(heads)[:top_k]  # type: ignore[arg-type]
                self.top_k = len(chosen)
                self.intervention.select_heads(chosen)
                mask = self.intervention.head_mask.unsqueeze(-1)
                self.intervention.offset.copy_(torch.randn_like(self.intervention.offset) * init_std * mask)
        self.intervention.scale.requires_grad_(stage == "localize")
        self.intervention.offset.requires_grad_(stage == "tune")
        self.intervention.attach(self.model)
        self.metric_directions: dict[str, bool] = {"val/loss": False, "val/accuracy": True, "val/reward_accuracy": True}

    @property
    def trained(self) -> nn.Parameter:
        """The parameter this stage trains: ``A`` (localize) or ``v`` (tune)."""
        return self.intervention.scale if self.stage == "localize" else self.intervention.offset

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Logits ``[B, L, vocab]`` of the decoder with the intervention."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def _sequence_log_probs(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
        labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
        mask = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
        policy = sequence_log_probs(self(ids, mask), labels)
        with torch.no_grad(), self.intervention.disabled():  # the reference: the base model
            reference = sequence_log_probs(self(ids, mask), labels)
        return policy, reference

    def _losses(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        if self.loss_name == "sft":
            logits = self(batch["chosen_input_ids"], batch.get("chosen_attention_mask"))
            loss = sft_loss(logits, batch["chosen_labels"])
            return loss, {"accuracy": answer_token_accuracy(logits.detach(), batch["chosen_labels"])}
        policy, reference = self._sequence_log_probs(batch)
        pc, pr = policy.chunk(2)
        rc, rr = reference.chunk(2)
        loss = dpo_loss(pc, pr, rc, rr, self.dpo_beta)
        return loss, {"reward_accuracy": ((pc - rc) > (pr - rr)).float().mean()}

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, _ = self._losses(batch)
        size = len(batch["chosen_input_ids"])
        if self.l1_lambda:
            l1 = self.trained.abs().sum()
            self.log("train/l1", l1.detach(), batch_size=size)
            loss = loss + self.l1_lambda * l1
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=size)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        loss, metrics = self._losses(batch)
        size = len(batch["chosen_input_ids"])
        self.log("val/loss", loss, prog_bar=True, batch_size=size, sync_dist=True)
        for name, value in metrics.items():
            self.log(f"val/{name}", value, batch_size=size, sync_dist=True)

    def configure_optimizers(self) -> Any:
        params = [self.trained]
        optimizer: torch.optim.Optimizer
        if self.optimizer_factory is None:
            optimizer = torch.optim.AdamW(params, lr=_DEFAULT_LR[self.stage], weight_decay=0.0)
        else:
            optimizer = self.optimizer_factory(params)
        if self.lr_scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.lr_scheduler_factory(optimizer)}

    # -- results ---------------------------------------------------------------------------------
    def top_heads(self, k: int | None = None) -> list[tuple[int, int]]:
        """The ``k`` (default ``top_k``) heads by decreasing ``||A||_2`` (localize) or the tuned heads."""
        if self.stage == "tune":
            return self.intervention.selected_heads()
        return self.intervention.rank_heads(k if k is not None else self.top_k)

    def save_intervention(self, path: str | os.PathLike[str]) -> None:
        """Write the ranked top heads with their ``A`` (localize) or the tuned ``v`` (tune) to ``path``."""
        self.intervention.save(path, self.top_heads())

    def on_train_end(self) -> None:
        if self.save_path is not None and self.trainer.is_global_zero:
            folder = os.path.dirname(os.fspath(self.save_path))
            if folder:
                os.makedirs(folder, exist_ok=True)
            self.save_intervention(self.save_path)

    # -- checkpoints: the frozen decoder stays out ----------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("model.")]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        for key, value in self.state_dict().items():
            if key.startswith("model."):
                state.setdefault(key, value)
