"""OnePrompt: one shared prefix prompt for a frozen ViT, no pool and no query pass."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_mtl.continual.base import ContinualModule
from lightning_mtl.continual.prompts import build_prompted_vit

__all__ = ["OnePrompt"]


class OnePrompt(ContinualModule):
    """OnePrompt (Huang, Chen, Hsu, "OVOR: OnePrompt with Virtual Outlier Regularization for
    Rehearsal-Free Class-Incremental Learning", ICLR 2024).

    DualPrompt without the pool: one prefix prompt shared by every input and every task, ``g_length``
    prefix keys (and as many values) at each block of ``g_layers`` and ``e_length`` at each block of
    ``e_layers``. No query pass and no key matching, so inference is a single ViT pass. The head reads
    the [CLS] output; the loss is the base's cross-entropy on the seen classes. OVOR is this module plus
    the virtual-outlier regularization of the head
    (:class:`~lightning_mtl.continual.vor.VirtualOutlierRegularization`).

    Defaults are the official code's (``--prompt_param 10 40 10``): its lengths count keys and values
    together, so its g-length 10 / e-length 40 (METHODS.md) are 5 / 20 keys here, at blocks 0-1 / 2-4.
    As there, the prefixes are raw attention keys / values (``project_prefix=False``: not passed through
    the blocks' key / value projections) and start uniform in (0, 1).

    Args:
        num_classes: classes of the stream.
        backbone: timm ViT name (or a ready ViT module), see
            :func:`~lightning_mtl.continual.prompts.build_prompted_vit`.
        checkpoint_path: local file of pretrained weights (nothing downloads).
        vit_kwargs: extra timm arguments (e.g. a tiny ViT).
        g_length: prefix keys (and values) per block of ``g_layers``.
        g_layers: blocks with the first part of the prompt.
        e_length: prefix keys (and values) per block of ``e_layers``.
        e_layers: blocks with the second part of the prompt.
        project_prefix: pass the prefixes through the blocks' key / value projections (the DualPrompt
            paper's formula) instead of using them as raw keys / values (the OVOR code).
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
        project_prefix: bool = False,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(num_classes, optimizer=optimizer, lr_scheduler=lr_scheduler)
        # a ready ViT module is no hyperparameter (the names / paths / kwargs that build one are)
        ignore = ["optimizer", "lr_scheduler"] + (["backbone"] if isinstance(backbone, nn.Module) else [])
        self.save_hyperparameters(ignore=ignore)
        self.vit = build_prompted_vit(backbone, checkpoint_path, vit_kwargs, project_prefix=project_prefix)
        dim, depth = self.vit.embed_dim, self.vit.depth
        # block -> prefix length; a block in both lists gets both parts (e first, as in the official code)
        self.prompt_layers: list[int] = []
        lengths: list[int] = []
        for layers, length in ((e_layers, e_length), (g_layers, g_length)):
            if length < 0:
                raise ValueError(f"prompt lengths must be >= 0, got {length}")
            for layer in layers:
                if not 0 <= int(layer) < depth:
                    raise ValueError(f"prompt block {layer} outside 0 .. {depth - 1}")
                if length == 0:
                    continue
                if int(layer) in self.prompt_layers:
                    lengths[self.prompt_layers.index(int(layer))] += int(length)
                else:
                    self.prompt_layers.append(int(layer))
                    lengths.append(int(length))
        if not self.prompt_layers:
            raise ValueError("OnePrompt needs a prompt: give g_layers / e_layers with positive lengths")
        # one [2, L, D] (keys, values) parameter per prompted block
        self.prompts = nn.ParameterList(
            [nn.Parameter(torch.empty(2, length, dim).uniform_(0.0, 1.0)) for length in lengths]
        )
        self.head = nn.Linear(dim, num_classes)

    def prefixes(self) -> dict[int, tuple[Tensor, Tensor]]:
        """Block -> shared ``(keys [L, D], values [L, D])``."""
        return {layer: (p[0], p[1]) for layer, p in zip(self.prompt_layers, self.prompts, strict=True)}

    def prompt_parameters(self) -> list[nn.Parameter]:
        """The prompt (what OVOR freezes before regularizing the head)."""
        return list(self.prompts)

    def features(self, x: Tensor) -> Tensor:
        return self.vit.forward_features(x, prefixes=self.prefixes())[:, 0]
