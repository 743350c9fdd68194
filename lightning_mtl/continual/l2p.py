"""L2P: a key-matched pool of input prompts for a frozen ViT."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_mtl.continual.base import ContinualModule, mask_unseen
from lightning_mtl.continual.prompts import PromptPool, build_prompted_vit

__all__ = ["L2P"]


class L2P(ContinualModule):
    """Learning to Prompt (Wang et al., "Learning to Prompt for Continual Learning", CVPR 2022).

    A frozen ViT and a pool of ``pool_size`` (key, prompt) pairs, each prompt ``length`` tokens. Each
    input takes the ``top_k`` entries whose keys are most cosine-similar to its query (the [CLS] feature
    of a plain pass of the frozen ViT); their ``top_k * length`` tokens are prepended to the patch tokens
    after [CLS] at the input (prompt tuning), and the head reads the mean of their outputs. Loss:
    cross-entropy on the seen classes plus ``pull_coef`` times the pull loss
    ``mean_b sum_{i in top-k(b)} (1 - cos(q_b, k_i))`` (the paper's surrogate loss sums over the selected
    keys).

    Defaults are the paper's: pool 10, length 5, top-5, pull coefficient 0.1 (the Si-Blurry code uses
    0.5 and a mean over the selected keys); keys and prompts start uniform in (-1, 1). Left out: the
    paper's optional diversified selection (it counts selections per *task*; the online stream has no
    tasks) and the official code's batch-wise selection at test time (it makes a prediction depend on
    the other images of its batch).

    After a training forward, ``self.last_selection = (query, indices [B, top_k], similarity [B, P])``.

    Args:
        num_classes: classes of the stream.
        backbone: timm ViT name (or a ready ViT module), see
            :func:`~lightning_mtl.continual.prompts.build_prompted_vit`.
        checkpoint_path: local file of pretrained weights (nothing downloads).
        vit_kwargs: extra timm arguments (e.g. a tiny ViT).
        pool_size: pool size.
        length: tokens per prompt.
        top_k: prompts per input.
        pull_coef: weight of the pull loss.
        optimizer: optimizer factory (default Adam, lr 5e-3).
        lr_scheduler: optional scheduler factory.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str | nn.Module = "vit_base_patch16_224",
        checkpoint_path: str | None = None,
        vit_kwargs: dict[str, Any] | None = None,
        pool_size: int = 10,
        length: int = 5,
        top_k: int = 5,
        pull_coef: float = 0.1,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(num_classes, optimizer=optimizer, lr_scheduler=lr_scheduler)
        # a ready ViT module is no hyperparameter (the names / paths / kwargs that build one are)
        ignore = ["optimizer", "lr_scheduler"] + (["backbone"] if isinstance(backbone, nn.Module) else [])
        self.save_hyperparameters(ignore=ignore)
        if length < 1 or not 1 <= top_k <= pool_size:
            raise ValueError(f"need length >= 1 and 1 <= top_k <= pool_size; got {length}, {top_k}, {pool_size}")
        self.vit = build_prompted_vit(backbone, checkpoint_path, vit_kwargs)
        self.top_k, self.length, self.pull_coef = int(top_k), int(length), float(pull_coef)
        self.pool = PromptPool(pool_size, length, self.vit.embed_dim, num_layers=1, prefix=False)
        self.head = nn.Linear(self.vit.embed_dim, num_classes)
        self.last_selection: tuple[Tensor, Tensor, Tensor] | None = None

    def select_prompts(self, query: Tensor) -> tuple[Tensor, Tensor]:
        """``(indices [B, top_k], cosine similarity to every key [B, P])``."""
        return self.pool.select(query, self.top_k)

    def prompted_features(self, x: Tensor, indices: Tensor) -> Tensor:
        """Mean output ``[B, D]`` of the prompt tokens of entries ``indices`` ``[B, top_k]``."""
        batch, dim = x.shape[0], self.vit.embed_dim
        prompts = self.pool(indices).reshape(batch, -1, dim)  # [B, top_k * length, D]
        tokens = self.vit.forward_features(x, prompts={0: prompts})
        start = self.vit.num_prefix_tokens
        return tokens[:, start : start + prompts.shape[1]].mean(dim=1)

    def features(self, x: Tensor) -> Tensor:
        query = self.vit.query(x)
        indices, similarity = self.select_prompts(query)
        if self.training:
            self.last_selection = (query, indices, similarity)
        return self.prompted_features(x, indices)

    @staticmethod
    def pull_loss(indices: Tensor, similarity: Tensor) -> Tensor:
        """``mean_b sum_i (1 - similarity[b, indices[b, i]])`` over the selected keys."""
        return (1.0 - similarity.gather(1, indices)).sum(dim=1).mean()

    def training_loss(self, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
        self.last_selection = None
        logits = mask_unseen(self(batch.x), batch.num_seen)
        ce = F.cross_entropy(logits, batch.y)
        assert self.last_selection is not None
        _, indices, similarity = self.last_selection
        pull = self.pull_loss(indices, similarity)
        return ce + self.pull_coef * pull, {"logits": logits, "ce": ce.detach(), "pull": pull.detach()}
