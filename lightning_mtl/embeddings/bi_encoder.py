"""A bi-encoder (one Hugging Face encoder for both sides of a pair) trained with in-batch negatives."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor, nn

from lightning_mtl._distributed import distributed_world_size, gather_rows_with_grad
from lightning_mtl._hparams import save_init_hyperparameters
from lightning_mtl.architectures.transformers_encoder import TransformersEncoder, pool
from lightning_mtl.embeddings.losses import create_loss
from lightning_mtl.embeddings.moe import moe_surgery, routing

__all__ = ["BiEncoder", "pool_tokens"]

Pooling = Literal["mean", "cls", "last"]
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def pool_tokens(hidden: Tensor, mask: Tensor, mode: str) -> Tensor:
    """``[B, L, D]`` token states -> ``[B, D]``: ``"mean"`` over the tokens ``mask`` marks, the first token
    (``"cls"``) or the last marked token (``"last"``, for decoder-style encoders; left or right padding)."""
    if mode == "last":
        positions = torch.arange(mask.shape[1], device=mask.device)
        last = (mask.long() * positions).argmax(1)  # the highest marked position of each row
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if mode not in ("mean", "cls"):
        raise ValueError(f"pooling must be 'mean', 'cls' or 'last', got {mode!r}")
    return pool(hidden, mask, mode)


def _check_folder(path: str) -> None:
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"model folder {path!r} has no config.json: give a local Hugging Face model folder")
    if not any((folder / name).is_file() for name in _WEIGHTS):
        raise FileNotFoundError(
            f"model folder {path!r} has no weights ({' or '.join(_WEIGHTS[::2])}); nothing is downloaded: "
            "save the model there with `save_pretrained`, or give `config` for a random initialisation"
        )


class BiEncoder(pl.LightningModule):
    """Sentence embeddings from a Hugging Face encoder, trained on batches of (anchor, positive, optional
    hard negatives, optional domain) with a contrastive loss over in-batch negatives.

    Reimers & Gurevych, "Sentence-BERT: Sentence Embeddings using Siamese BERT-Networks", EMNLP 2019 (the
    bi-encoder); Henderson et al., 2017 (multiple-negatives ranking); with ``num_experts``: Hallee et al.,
    "Contrastive Learning and Mixture of Experts Enables Precise Vector Embeddings", arXiv 2401.15713
    (every feed-forward block split into one expert per domain, enforced routing by the batch's domain ids).

    A batch is a dict: ``anchor`` and ``positive`` (each ``{"input_ids", "attention_mask"}`` of ``[B, L]``),
    optionally ``negative`` (``[B, K, L]`` each: ``K`` hard negatives per anchor) and ``domain`` (``[B]``
    ints; hard negatives take their anchor's). Under DDP the embeddings of every rank are gathered with
    gradients before the loss (``gather_across_ranks``), so each anchor meets the negatives of the global
    batch and the update equals the single-process update on the concatenated batch. With experts, DDP
    needs ``find_unused_parameters`` (a rank's batch may lack a domain); setup says so otherwise.

    Args:
        path: local model folder (``config.json`` and weights); nothing is downloaded.
        config: instead of ``path``: a config dict with ``model_type`` (random initialisation).
        pooling: ``"mean"``, ``"cls"`` or ``"last"`` (last non-padding token).
        normalize: L2-normalise the embeddings (what :meth:`embed` returns and the loss sees).
        projection_dim: a linear projection of the pooled state to this size (``None``: none).
        loss: a registered contrastive loss (:func:`~lightning_mtl.embeddings.list_losses`).
        loss_kwargs: its keyword arguments (``{"scale": 20.0, "similarity": "cosine"}``...).
        num_experts: ``> 0`` runs :func:`~lightning_mtl.embeddings.moe_surgery` with that many experts;
            batches must then carry ``domain``.
        gather_across_ranks: under DDP, use the other ranks' samples as negatives too.
        optimizer: optimizer factory, called with the parameters (AdamW; the official MoE recipe uses lr 1e-4).
        init_from: a Lightning checkpoint of a ``BiEncoder`` of the same architecture whose weights this one
            starts from (fine-tuning experts from one pre-trained run); its optimizer state and epoch are not read.
    """

    def __init__(
        self,
        path: str | None = None,
        config: dict[str, Any] | None = None,
        pooling: Pooling = "mean",
        normalize: bool = False,
        projection_dim: int | None = None,
        loss: str = "mnr",
        loss_kwargs: dict[str, Any] | None = None,
        num_experts: int = 0,
        gather_across_ranks: bool = True,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        save_init_hyperparameters(self, ["optimizer"])
        if pooling not in ("mean", "cls", "last"):
            raise ValueError(f"pooling must be 'mean', 'cls' or 'last', got {pooling!r}")
        if path is not None:
            _check_folder(path)
        self.encoder = TransformersEncoder(path=path, config=config)
        if isinstance(getattr(self.encoder.model, "pooler", None), nn.Module):
            # the pooler's output is never used: under DDP its parameters would stall the gradient reduction
            self.encoder.model.pooler = None
        self.loss_fn = create_loss(loss, **(loss_kwargs or {}))
        self.num_experts = int(num_experts)
        if self.num_experts:
            moe_surgery(self.encoder.model, self.num_experts)
        width = self.encoder.out_features
        self.projection = nn.Linear(width, projection_dim) if projection_dim else None
        self.embedding_dim = projection_dim or width
        self.pooling, self.normalize, self.gather_across_ranks = pooling, normalize, gather_across_ranks
        self.optimizer_factory = optimizer
        # {logged key: higher is better}, for BestMetricsSummary; the evaluation callbacks add theirs
        self.metric_directions: dict[str, bool] = {"train/loss": False, "val/loss": False, "test/loss": False}
        if init_from is not None:
            self._load_weights(init_from)

    def _load_weights(self, path: str) -> None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"init_from checkpoint {path!r} does not exist")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        own = self.state_dict()
        for key, value in state.items():
            if key in own and tuple(value.shape) != tuple(own[key].shape):
                raise ValueError(f"init_from checkpoint {path!r} does not fit this BiEncoder: {key!r} has shape "
                                 f"{tuple(value.shape)}, this model's is {tuple(own[key].shape)}")  # fmt: skip
        missing, unexpected = self.load_state_dict(state, strict=False)
        if missing or unexpected:
            what = f"lacks {missing[0]!r}" if missing else f"has {unexpected[0]!r}, which this model has not"
            raise ValueError(f"init_from checkpoint {path!r} does not fit this BiEncoder: it {what}")

    def setup(self, stage: str) -> None:
        tokenizer = getattr(self.trainer.datamodule, "tokenizer", None)  # type: ignore[attr-defined]
        vocab = int(self.encoder.model.config.vocab_size)
        if tokenizer is not None and len(tokenizer) > vocab:
            raise ValueError(
                f"the data's tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {vocab}: "
                "raise the model config's vocab_size or lower the data's vocab_size"
            )
        strategy = self.trainer.strategy
        if self.num_experts > 1 and isinstance(strategy, DDPStrategy):
            if not getattr(strategy, "_ddp_kwargs", {}).get("find_unused_parameters"):
                raise ValueError(
                    "a BiEncoder with experts leaves the experts of domains absent from a rank's batch unused: "
                    "use strategy 'ddp_find_unused_parameters_true' (or DDPStrategy(find_unused_parameters=True))"
                )

    def embed(self, features: dict[str, Tensor], domain: Tensor | int | None = None) -> Tensor:
        """``{"input_ids", "attention_mask"}`` ``[B, L]`` -> embeddings ``[B, embedding_dim]``.

        Args:
            features: token ids and attention mask.
            domain: ``[B]`` expert ids (or one int for all), needed when the model has experts.
        """
        ids, mask = features["input_ids"], features["attention_mask"]
        if self.num_experts and domain is None:
            raise ValueError(f"this BiEncoder has {self.num_experts} experts: give a domain id per sample")
        route = routing(self.encoder.model, domain) if self.num_experts and domain is not None else nullcontext()
        with route:
            hidden = self.encoder.model(input_ids=ids, attention_mask=mask).last_hidden_state
        out = pool_tokens(hidden, mask, self.pooling)
        if self.projection is not None:
            out = self.projection(out)
        return F.normalize(out, dim=-1) if self.normalize else out

    @torch.no_grad()
    def encode(
        self,
        texts: list[str],
        tokenizer: Any,
        domain: int | list[int] | None = None,
        batch_size: int = 64,
        max_length: int = 128,
    ) -> Tensor:
        """Embeddings ``[N, embedding_dim]`` of ``texts`` in eval mode (restored after), in batches.

        Args:
            texts: the texts.
            tokenizer: a ``transformers`` tokenizer.
            domain: the expert every text uses, or one per text (needed when the model has experts).
            batch_size: texts per forward pass.
            max_length: truncation length in tokens.
        """
        training = self.training
        self.eval()
        parts = []
        for start in range(0, len(texts), batch_size):
            tokens = tokenizer(texts[start : start + batch_size], padding=True, truncation=True,
                               max_length=max_length, return_tensors="pt")  # fmt: skip
            features = {k: tokens[k].to(self.device) for k in ("input_ids", "attention_mask")}
            route = (
                torch.tensor(domain[start : start + batch_size], device=self.device)
                if isinstance(domain, list)
                else domain
            )
            parts.append(self.embed(features, route).float())
        self.train(training)
        return torch.cat(parts) if parts else torch.zeros(0, self.embedding_dim, device=self.device)

    def forward(self, features: dict[str, Tensor], domain: Tensor | int | None = None) -> Tensor:
        return self.embed(features, domain)

    def embed_batch(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor | None]:
        """The anchors ``[B, D]``, positives ``[B, D]`` and hard negatives ``[B, K, D]`` (or ``None``) of a
        batch, on this rank only."""
        domain = batch.get("domain")
        anchors = self.embed(batch["anchor"], domain)
        positives = self.embed(batch["positive"], domain)
        negatives = None
        if batch.get("negative") is not None:
            features = {k: v.flatten(0, 1) for k, v in batch["negative"].items()}
            b, k = batch["negative"]["input_ids"].shape[:2]
            per_negative = domain.repeat_interleave(k) if isinstance(domain, Tensor) else domain
            negatives = self.embed(features, per_negative).view(b, k, -1)
        return anchors, positives, negatives

    def batch_loss(self, batch: dict[str, Any]) -> Tensor:
        """The loss of a batch; under DDP (``gather_across_ranks``) that of the batch of all ranks."""
        anchors, positives, negatives = self.embed_batch(batch)
        if self.gather_across_ranks and distributed_world_size() > 1:
            anchors, positives = gather_rows_with_grad(anchors), gather_rows_with_grad(positives)
            negatives = None if negatives is None else gather_rows_with_grad(negatives)
        return self.loss_fn(anchors, positives, negatives)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = self.batch_loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["anchor"]["input_ids"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss = self.batch_loss(batch)
        self.log("val/loss", loss, sync_dist=True, batch_size=batch["anchor"]["input_ids"].shape[0])

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss = self.batch_loss(batch)
        self.log("test/loss", loss, sync_dist=True, batch_size=batch["anchor"]["input_ids"].shape[0])

    def configure_optimizers(self) -> Any:
        return self.optimizer_factory(self.parameters())
