"""DualPrompt: a shared g-prompt and a key-matched pool of e-prompts, by prefix tuning of a frozen ViT."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_mtl.continual.base import ContinualModule, mask_unseen
from lightning_mtl.continual.prompts import PromptPool, build_prompted_vit

__all__ = ["DualPrompt"]


class DualPrompt(ContinualModule):
    """DualPrompt (Wang et al., "DualPrompt: Complementary Prompting for Rehearsal-free Continual
    Learning", ECCV 2022), online and task-free as in Si-Blurry (Moon et al., ICCV 2023).

    A frozen ViT; a g(eneral)-prompt of ``g_length`` prefix keys and values at each block of
    ``g_layers``, shared by all inputs; a pool of ``pool_size`` e(xpert)-prompts of ``e_length`` prefix
    keys and values at each block of ``e_layers``, one pool key per entry. Each input takes the single
    entry whose key is most cosine-similar to its query, the [CLS] feature of a plain pass of the frozen
    ViT (no task ids: the paper trains with task ids, the online setting has none). The head reads the
    [CLS] output of the prompted pass. Loss: cross-entropy on the seen classes plus ``pull_coef`` times
    the pull loss ``mean_b (1 - cos(q_b, k_{s_b}))``, which draws the selected keys to their queries.

    Defaults are the paper's and the Si-Blurry code's: g-prompt length 5 at blocks 0-1, pool 10 of
    length 20 at blocks 2-4, pull coefficient 1, Adam lr 5e-3 (the base's default); prompts and keys
    start uniform in (-1, 1).

    API for subclasses (MVP builds on it):

    - ``self.vit``: the frozen :class:`~lightning_mtl.continual.prompts.PromptedViT`;
      ``self.vit.query(x)`` is the ``[B, D]`` query (no gradient).
    - ``self.g_prompt``: ``[len(g_layers), 2, g_length, D]`` parameter (keys at ``[:, 0]``, values at
      ``[:, 1]``), or None; ``self.e_pool``: the :class:`~lightning_mtl.continual.prompts.PromptPool`
      (``keys [P, D]``, ``prompts [P, len(e_layers), 2, e_length, D]``), or None.
    - :meth:`select_prompts` ``(query) -> (indices [B], similarity [B, P])``: which e-prompt each input
      takes; override to change the selection (e.g. frequency weighting).
    - :meth:`prompted_features` ``(x, indices) -> [B, D]``: the [CLS] feature of the pass with the
      g-prompt and the given e-prompts.
    - :meth:`features` runs query -> select -> prompted features and, in training mode, keeps
      ``self.last_selection = (query, indices, similarity)`` for the loss terms of the same step.
    - :meth:`pull_loss` ``(indices, similarity) -> scalar``; :meth:`training_loss` adds it to the CE.

    Args:
        num_classes: classes of the stream.
        backbone: timm ViT name (or a ready ViT module), see
            :func:`~lightning_mtl.continual.prompts.build_prompted_vit`.
        checkpoint_path: local file of pretrained weights (nothing downloads).
        vit_kwargs: extra timm arguments (e.g. a tiny ViT).
        g_length: g-prompt prefix length (keys; as many values); 0 disables the g-prompt.
        g_layers: blocks with the g-prompt.
        e_length: e-prompt prefix length; 0 disables the e-prompts (and the query pass).
        e_layers: blocks with the e-prompt.
        pool_size: e-prompt pool size.
        pull_coef: weight of the pull loss.
        project_prefix: prefixes go through the blocks' key / value projections (the paper's formula and
            the Si-Blurry code) rather than being raw keys / values.
        optimizer: optimizer factory (default Adam, lr 5e-3).
        lr_scheduler: optional scheduler factory.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str | nn.Module = "vit_base_patch16_224",
        checkpoint_path: str | None = None,
        vit_kwargs: dict[str, Any] | None = None,
        g_length: int = 5,
        g_layers: Sequence[int] = (0, 1),
        e_length: int = 20,
        e_layers: Sequence[int] = (2, 3, 4),
        pool_size: int = 10,
        pull_coef: float = 1.0,
        project_prefix: bool = True,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(num_classes, optimizer=optimizer, lr_scheduler=lr_scheduler)
        # a ready ViT module is no hyperparameter (the names / paths / kwargs that build one are)
        ignore = ["optimizer", "lr_scheduler"] + (["backbone"] if isinstance(backbone, nn.Module) else [])
        self.save_hyperparameters(ignore=ignore)
        if g_length < 0 or e_length < 0 or pool_size < 1:
            raise ValueError(
                f"need g_length, e_length >= 0 and pool_size >= 1; got {g_length}, {e_length}, {pool_size}"
            )
        self.vit = build_prompted_vit(backbone, checkpoint_path, vit_kwargs, project_prefix=project_prefix)
        dim, depth = self.vit.embed_dim, self.vit.depth
        self.g_layers, self.e_layers = [int(i) for i in g_layers], [int(i) for i in e_layers]
        for name, layers in (("g_layers", self.g_layers), ("e_layers", self.e_layers)):
            if any(not 0 <= i < depth for i in layers) or len(set(layers)) != len(layers):
                raise ValueError(f"{name} must be distinct blocks in 0 .. {depth - 1}, got {layers}")
        self.pull_coef = float(pull_coef)
        self.g_prompt: nn.Parameter | None = None
        if g_length > 0 and self.g_layers:
            self.g_prompt = nn.Parameter(torch.empty(len(self.g_layers), 2, g_length, dim).uniform_(-1.0, 1.0))
        self.e_pool: PromptPool | None = None
        if e_length > 0 and self.e_layers:
            self.e_pool = PromptPool(pool_size, e_length, dim, num_layers=len(self.e_layers), prefix=True)
        self.head = nn.Linear(dim, num_classes)
        self.last_selection: tuple[Tensor, Tensor, Tensor] | None = None

    # -- pieces a subclass may override -----------------------------------------------------------
    def select_prompts(self, query: Tensor) -> tuple[Tensor, Tensor]:
        """The e-prompt of each input: ``(indices [B], cosine similarity to every key [B, P])``."""
        assert self.e_pool is not None
        indices, similarity = self.e_pool.select(query, top_k=1)
        return indices[:, 0], similarity

    def prefixes(self, indices: Tensor | None, batch: int) -> dict[int, tuple[Tensor, Tensor]]:
        """Block -> ``(keys, values)`` ``[B, L, D]`` of the g-prompt and the e-prompts ``indices`` ``[B]``;
        where a block has both, the e-prompt's come first."""
        out: dict[int, tuple[Tensor, Tensor]] = {}
        if self.e_pool is not None and indices is not None:
            e = self.e_pool(indices)  # [B, layers, 2, L, D]
            for j, layer in enumerate(self.e_layers):
                out[layer] = (e[:, j, 0], e[:, j, 1])
        if self.g_prompt is not None:
            for j, layer in enumerate(self.g_layers):
                gk, gv = (p.unsqueeze(0).expand(batch, -1, -1) for p in self.g_prompt[j])
                if layer in out:
                    ek, ev = out[layer]
                    gk, gv = torch.cat([ek, gk], dim=1), torch.cat([ev, gv], dim=1)
                out[layer] = (gk, gv)
        return out

    def prompted_features(self, x: Tensor, indices: Tensor | None) -> Tensor:
        """The [CLS] feature ``[B, D]`` of the pass with the g-prompt and e-prompts ``indices`` ``[B]``."""
        return self.vit.forward_features(x, prefixes=self.prefixes(indices, x.shape[0]))[:, 0]

    def features(self, x: Tensor) -> Tensor:
        if self.e_pool is None:
            self.last_selection = None
            return self.prompted_features(x, None)
        query = self.vit.query(x)
        indices, similarity = self.select_prompts(query)
        if self.training:
            self.last_selection = (query, indices, similarity)
        return self.prompted_features(x, indices)

    @staticmethod
    def pull_loss(indices: Tensor, similarity: Tensor) -> Tensor:
        """``mean_b (1 - similarity[b, indices[b]])``: pulls each selected key towards its query."""
        return (1.0 - similarity.gather(1, indices.reshape(-1, 1))).mean()

    def training_loss(self, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
        self.last_selection = None
        logits = mask_unseen(self(batch.x), batch.num_seen)
        loss = F.cross_entropy(logits, batch.y)
        extras: dict[str, Tensor] = {"logits": logits, "ce": loss.detach()}
        if self.last_selection is not None:
            _, indices, similarity = self.last_selection
            pull = self.pull_loss(indices, similarity)
            loss = loss + self.pull_coef * pull
            extras["pull"] = pull.detach()
        return loss, extras
