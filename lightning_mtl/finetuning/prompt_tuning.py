"""Prompt tuned embedding classification (PTEC): soft prompts before a frozen encoder, a multi-label head,
per-label thresholds chosen on validation."""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics.functional.classification import multilabel_average_precision, multilabel_f1_score

from lightning_mtl._distributed import gather_rows
from lightning_mtl._hparams import save_init_hyperparameters
from lightning_mtl.architectures.transformers_encoder import TransformersEncoder, pool

__all__ = ["PromptTunedClassifier", "choose_thresholds"]


def choose_thresholds(probs: Tensor, targets: Tensor, default: float = 0.5) -> Tensor:
    """Per label, the decision threshold with the best F1 on held-out scores.

    A text gets label ``k`` when ``probs[:, k] >= threshold[k]``. The candidates are the label's own scores;
    the one with the highest F1 wins, ties going to the highest threshold (fewer positives). A label without
    any positive text keeps ``default``: every threshold gives it F1 = 0.

    Args:
        probs: ``[N, K]`` scores (probabilities).
        targets: ``[N, K]`` 0/1 labels.
        default: threshold of labels without positives (and of every label when ``N = 0``).

    Returns:
        ``[K]`` float32 thresholds.
    """
    probs, targets = probs.detach().float(), targets.detach().float()
    thresholds = torch.full((probs.shape[1],), float(default), dtype=torch.float32, device=probs.device)
    if probs.shape[0] == 0:
        return thresholds
    scores, order = probs.sort(dim=0, descending=True)
    # taking the i + 1 highest scores: true positives, and F1 = 2 TP / (predicted + actual positives)
    true_positives = targets.gather(0, order).cumsum(0)
    predicted = torch.arange(1, probs.shape[0] + 1, device=probs.device, dtype=torch.float32).unsqueeze(1)
    positives = targets.sum(0)
    f1 = 2 * true_positives / (predicted + positives)
    # a cut is only possible after the last of equal scores
    last_of_tie = torch.ones_like(scores, dtype=torch.bool)
    last_of_tie[:-1] = scores[:-1] != scores[1:]
    f1 = torch.where(last_of_tie, f1, torch.full_like(f1, -1.0))
    best = f1.argmax(0)  # the first maximum: the highest threshold among equals
    chosen = scores.gather(0, best.unsqueeze(0)).squeeze(0)
    return torch.where(positives > 0, chosen, thresholds)


class PromptTunedClassifier(pl.LightningModule):
    """Prompt Tuned Embedding Classification (PTEC): multi-label classification by a frozen encoder that reads
    learned soft prompt tokens before each text, and a linear head on its pooled embedding.

    Buchner, Cao, Kalo and von Ehrenheim, "Prompt Tuned Embedding Classification for Multi-Label Industry
    Sector Allocation", NAACL 2024 (industry track), arXiv 2309.12075 (official code:
    github.com/EQTPartners/PTEC); soft prompts from Lester, Al-Rfou and Constant, "The Power of Scale for
    Parameter-Efficient Prompt Tuning", EMNLP 2021.

    ``prompt_length`` vectors ``P`` (in the encoder's word-embedding space) are put before the embedded tokens
    of every text; the encoder (frozen, any Hugging Face model that takes ``inputs_embeds``) reads them like
    words, the text's tokens are pooled (``mean`` / ``cls`` / ``last``, prompt positions left out) and a
    linear head gives one logit per label. Only ``P`` and the head train, with binary cross-entropy per
    label (``pos_weight="balanced"``: ``max_k n_k / n_k`` for a label in ``n_k`` training texts, as the
    official code), AdamW with a learning rate for the prompt and one for the head (the paper's
    differential learning rates) and an exponential decay of both to ``lr_decay`` times their start.

    After each validation the per-label thresholds with the best validation F1 are chosen
    (:func:`choose_thresholds`; ``thresholds=<float>`` fixes one for all labels instead, the official code
    uses 0.5). They are a buffer: saved in checkpoints and used by ``test`` and ``predict``.

    Logged: ``train/loss``; ``val/loss``, ``val/map`` (mean average precision, no threshold),
    ``val/f1_micro`` / ``val/f1_macro`` (at the thresholds just chosen on this same validation set:
    optimistic); ``test/loss``, ``test/map``, ``test/f1_micro``, ``test/f1_macro`` (at the stored
    thresholds). Under DDP every rank's validation scores are gathered, so all ranks choose the same
    thresholds; the training loss is each rank's batch mean and DDP averages the gradients (the
    single-process step on the concatenated batch when the ranks' batches are equally large). The frozen
    encoder is left out of checkpoints (it is rebuilt from ``path`` / ``config``).

    Args:
        num_labels: number of labels ``K``.
        path: local folder of a ``transformers`` encoder (``AutoModel``; nothing is downloaded).
        config: instead: config dict (with ``model_type``) of a randomly initialised one, seeded by
            ``model_seed``.
        encoder: instead: the encoder itself (a ``transformers`` model or a
            :class:`~lightning_mtl.architectures.TransformersEncoder`), from Python.
        prompt_length: soft prompt tokens (0: the frozen model's own pooled embedding with a linear head).
        prompt_init: ``"vocab"``: embeddings of ``prompt_length`` distinct token ids drawn from the vocabulary
            (seeded by ``prompt_seed``; the padding id is never drawn); ``"labels"``: embeddings of the label
            names' tokens (the data module's ``label_token_ids()``, cut at random or filled from the
            vocabulary to ``prompt_length``), as the official code's default.
        pooling: ``"mean"`` over the text's tokens, ``"cls"`` (its first token) or ``"last"`` (its last
            non-padding token, as a decoder's classification head reads it).
        pos_weight: ``"balanced"`` (needs a data module with ``label_counts()``) or ``"none"``.
        thresholds: ``"validation"`` (chosen per label after each validation) or one fixed threshold.
        lr: learning rate of the prompt (official default 3e-3).
        head_lr: learning rate of the head (official default 1e-5).
        weight_decay: AdamW weight decay of both groups.
        lr_decay: both learning rates decay exponentially, per optimizer step, to this fraction at the last
            step (official: 0.01); ``None`` keeps them constant.
        pad_token_id: padding id of the inputs (default: the encoder config's, else 0).
        model_seed: seed of a ``config`` encoder's random weights.
        prompt_seed: seed of the prompt's token draw.
        optimizer: optimizer factory, called with the two parameter groups (their ``lr`` overrides its own);
            default AdamW.
    """

    def __init__(
        self,
        num_labels: int,
        path: str | None = None,
        config: dict[str, Any] | None = None,
        encoder: nn.Module | None = None,
        prompt_length: int = 100,
        prompt_init: Literal["vocab", "labels"] = "vocab",
        pooling: Literal["mean", "cls", "last"] = "mean",
        pos_weight: Literal["balanced", "none"] = "balanced",
        thresholds: Literal["validation"] | float = "validation",
        lr: float = 3e-3,
        head_lr: float = 1e-5,
        weight_decay: float = 0.0,
        lr_decay: float | None = 0.01,
        pad_token_id: int | None = None,
        model_seed: int = 0,
        prompt_seed: int = 0,
        optimizer: OptimizerCallable | None = None,
    ) -> None:
        super().__init__()
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        if prompt_length < 0:
            raise ValueError(f"prompt_length must be >= 0, got {prompt_length}")
        if prompt_init not in ("vocab", "labels"):
            raise ValueError(f"prompt_init must be 'vocab' or 'labels', got {prompt_init!r}")
        if pooling not in ("mean", "cls", "last"):
            raise ValueError(f"pooling must be 'mean', 'cls' or 'last', got {pooling!r}")
        if pos_weight not in ("balanced", "none"):
            raise ValueError(f"pos_weight must be 'balanced' or 'none', got {pos_weight!r}")
        if thresholds != "validation" and (isinstance(thresholds, str) or not 0 < float(thresholds) < 1):
            raise ValueError(f"thresholds must be 'validation' or a number in (0, 1), got {thresholds!r}")
        if lr_decay is not None and not 0 < lr_decay <= 1:
            raise ValueError(f"lr_decay must be in (0, 1] or None, got {lr_decay}")
        save_init_hyperparameters(self, ["encoder", "optimizer"], logger=False)
        model: Any = self._build(path, config, encoder, model_seed)  # a transformers model
        if not (hasattr(model, "get_input_embeddings") and hasattr(model, "config")):
            raise ValueError(
                "PromptTunedClassifier needs a transformers model (with get_input_embeddings() and a config), "
                f"and {type(model).__name__} is not one"
            )
        self.encoder = model.requires_grad_(False)
        embeddings, cfg = model.get_input_embeddings(), model.config
        self.pad_token_id = int(pad_token_id if pad_token_id is not None else (getattr(cfg, "pad_token_id", 0) or 0))
        self.max_positions = getattr(cfg, "max_position_embeddings", None)
        self.prompt_init, self.prompt_seed = prompt_init, prompt_seed
        self.prompt = nn.Parameter(
            embeddings(self._vocab_ids(prompt_length, embeddings.num_embeddings)).detach().clone()
        )
        self.head = nn.Linear(int(cfg.hidden_size), num_labels)
        self.pooling = pooling
        self.pos_weight_rule = pos_weight
        self.pos_weight: Tensor
        self.register_buffer("pos_weight", torch.ones(num_labels))
        fixed = None if isinstance(thresholds, str) else float(thresholds)
        self.fixed_threshold = fixed
        self.thresholds: Tensor
        self.register_buffer("thresholds", torch.full((num_labels,), 0.5 if fixed is None else fixed))
        # set once the prompt holds its initial (or trained) values: a loaded checkpoint is never re-initialised
        self.prompt_ready: Tensor
        self.register_buffer("prompt_ready", torch.tensor(prompt_init == "vocab"))
        self.lr, self.head_lr, self.weight_decay, self.lr_decay = lr, head_lr, weight_decay, lr_decay
        self.optimizer_factory = optimizer
        self._scores: list[Tensor] = []
        self._targets: list[Tensor] = []
        self._losses: list[Tensor] = []
        self.metric_directions: dict[str, bool] = {
            f"{stage}/{key}": key != "loss"
            for stage in ("val", "test")
            for key in ("loss", "map", "f1_micro", "f1_macro")
        }

    @staticmethod
    def _build(path: str | None, config: dict[str, Any] | None, encoder: nn.Module | None, seed: int) -> nn.Module:
        if encoder is not None:
            if path is not None or config is not None:
                raise ValueError("give one of `encoder`, `path` or `config`")
            return encoder.model if isinstance(encoder, TransformersEncoder) else encoder
        with torch.random.fork_rng(devices=[]):  # the same frozen weights in every run, resumed ones too
            torch.manual_seed(seed)
            return TransformersEncoder(path=path, config=config).model

    def _vocab_ids(self, count: int, vocab_size: int) -> Tensor:
        generator = torch.Generator().manual_seed(self.prompt_seed)
        ids = torch.randperm(vocab_size, generator=generator)
        ids = ids[ids != self.pad_token_id][:count]
        if len(ids) < count:
            raise ValueError(f"prompt_length={count} needs as many distinct token ids, the vocabulary has {vocab_size}")
        return ids

    # -- set-up ------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        num_labels = getattr(datamodule, "num_labels", None)
        if num_labels is not None and num_labels != self.head.out_features:
            raise ValueError(
                f"the data have {num_labels} labels and the classifier num_labels={self.head.out_features}: "
                f"set num_labels: {num_labels}"
            )
        if self.pos_weight_rule == "balanced":
            if not hasattr(datamodule, "label_counts"):
                raise ValueError("pos_weight='balanced' needs a data module with label_counts() (MultiLabelText); "
                                 "use pos_weight='none' with other data")  # fmt: skip
            counts = datamodule.label_counts().float().clamp_min(1.0)  # type: ignore[union-attr]
            self.pos_weight.copy_(counts.max() / counts)
        if not bool(self.prompt_ready):
            if not hasattr(datamodule, "label_token_ids"):
                raise ValueError("prompt_init='labels' needs a data module with label_token_ids() (MultiLabelText); "
                                 "use prompt_init='vocab' with other data")  # fmt: skip
            self._init_from_labels(list(datamodule.label_token_ids()))  # type: ignore[union-attr]

    def _init_from_labels(self, token_ids: list[int]) -> None:
        count, embeddings = self.prompt.shape[0], self.word_embeddings
        ids = torch.tensor(token_ids, dtype=torch.long)
        generator = torch.Generator().manual_seed(self.prompt_seed)
        if len(ids) > count:  # a random subset, as the official code
            ids = ids[torch.randperm(len(ids), generator=generator)[:count]]
        elif len(ids) < count:  # filled with drawn vocabulary tokens
            fill = self._vocab_ids(embeddings.num_embeddings - 1, embeddings.num_embeddings)
            fill = fill[~torch.isin(fill, ids)][: count - len(ids)]
            ids = torch.cat([ids, fill])
        with torch.no_grad():
            self.prompt.copy_(embeddings(ids.to(self.prompt.device)))
            self.prompt_ready.fill_(True)

    @property
    def word_embeddings(self) -> nn.Embedding:
        """The frozen encoder's token embedding table (the space the prompt lives in)."""
        return self.encoder.get_input_embeddings()

    # -- forward -----------------------------------------------------------------------------------------
    def embed(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Pooled ``[B, hidden]`` embedding of the texts read after the soft prompt."""
        if attention_mask is None:
            attention_mask = (input_ids != self.pad_token_id).long()
        length, (batch, width) = self.prompt.shape[0], input_ids.shape
        if self.max_positions is not None and length + width > self.max_positions:
            raise ValueError(
                f"{length} prompt tokens + {width} text tokens exceed the encoder's {self.max_positions} positions: "
                "shorten the prompt or the data's max_length"
            )
        words = self.word_embeddings(input_ids)
        prompt = self.prompt.to(words.dtype).unsqueeze(0).expand(batch, -1, -1)
        mask = torch.cat([attention_mask.new_ones(batch, length), attention_mask], 1)
        hidden = self.encoder(inputs_embeds=torch.cat([prompt, words], 1), attention_mask=mask).last_hidden_state
        text = hidden[:, length:]
        if self.pooling == "last":  # right padding: the last token the mask keeps
            last = (attention_mask.sum(1) - 1).clamp_min(0)
            return text[torch.arange(batch, device=text.device), last]
        return pool(text, attention_mask, self.pooling)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Logits ``[B, K]``."""
        return self.head(self.embed(input_ids, attention_mask))

    def loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Binary cross-entropy per label, positives weighted by ``pos_weight``, mean over texts and labels."""
        return F.binary_cross_entropy_with_logits(logits.float(), targets.float(), pos_weight=self.pos_weight)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.loss(self(batch["input_ids"], batch["attention_mask"]), batch["labels"])
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=len(batch["labels"]))
        return loss

    def _collect(self, batch: dict[str, Tensor]) -> None:
        logits = self(batch["input_ids"], batch["attention_mask"]).float()
        self._losses.append(F.binary_cross_entropy_with_logits(
            logits, batch["labels"].float(), pos_weight=self.pos_weight, reduction="none").mean(1))  # fmt: skip
        self._scores.append(torch.sigmoid(logits))
        self._targets.append(batch["labels"].float())

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._collect(batch)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._collect(batch)

    def _gathered(self) -> tuple[Tensor, Tensor, Tensor]:
        width = self.head.out_features
        scores = torch.cat(self._scores) if self._scores else self.thresholds.new_zeros(0, width)
        targets = torch.cat(self._targets) if self._targets else self.thresholds.new_zeros(0, width)
        losses = torch.cat(self._losses) if self._losses else self.thresholds.new_zeros(0)
        self._scores, self._targets, self._losses = [], [], []
        # every rank's texts: the same thresholds and figures on all ranks
        return gather_rows(scores), gather_rows(targets), gather_rows(losses)

    def _log_figures(self, stage: str, scores: Tensor, targets: Tensor, losses: Tensor) -> None:
        if len(scores) == 0:
            return
        labels, width = targets.long(), self.head.out_features
        predicted = (scores >= self.thresholds).long()
        figures = {
            "loss": losses.mean(),
            "map": multilabel_average_precision(scores, labels, num_labels=width, average="macro"),
            "f1_micro": multilabel_f1_score(predicted, labels, num_labels=width, average="micro"),
            "f1_macro": multilabel_f1_score(predicted, labels, num_labels=width, average="macro"),
        }
        for name, value in figures.items():
            self.log(f"{stage}/{name}", value, prog_bar=name == "f1_macro")

    def on_validation_epoch_end(self) -> None:
        scores, targets, losses = self._gathered()
        if self.fixed_threshold is None and not self.trainer.sanity_checking and len(scores):
            self.thresholds.copy_(choose_thresholds(scores, targets))
        self._log_figures("val", scores, targets, losses)

    def on_test_epoch_end(self) -> None:
        self._log_figures("test", *self._gathered())

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """``{"scores": [B, K] probabilities, "labels": [B, K] 0/1 at the stored thresholds}``."""
        scores = torch.sigmoid(self(batch["input_ids"], batch.get("attention_mask")).float())
        return {"scores": scores, "labels": (scores >= self.thresholds).long()}

    # -- optimisation ------------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        groups = [
            {"params": [self.prompt], "lr": self.lr, "weight_decay": self.weight_decay},
            {"params": list(self.head.parameters()), "lr": self.head_lr, "weight_decay": self.weight_decay},
        ]
        if self.optimizer_factory is None:
            optimizer: torch.optim.Optimizer = torch.optim.AdamW(groups)
        else:
            optimizer = self.optimizer_factory(groups)
        total = self.trainer.estimated_stepping_batches
        if self.lr_decay is None or self.lr_decay == 1 or not math.isfinite(total):
            return optimizer
        rate = self.lr_decay ** (1.0 / max(int(total) - 1, 1))
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: rate**step)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # -- checkpoints: the frozen encoder stays out -------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("encoder.")]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        for key, value in self.state_dict().items():
            if key.startswith("encoder."):
                state.setdefault(key, value)
