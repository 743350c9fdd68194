"""Prompt machinery for a frozen timm Vision Transformer: prompt tuning, prefix tuning and key-matched pools.

Nothing of timm's model code is forked: :class:`PromptedViT` runs the model's own submodules
(``patch_embed``, ``_pos_embed``, ``patch_drop``, ``norm_pre``, ``blocks``, ``norm``) in a loop and, at
chosen blocks, either

- **prompt tuning** (Lester et al. 2021; L2P): prepends prompt tokens to the token sequence at the input
  of block ``i``, right after the class (prefix) tokens; they stay in the sequence up to the output, or
- **prefix tuning** (Li & Liang 2021; DualPrompt): prepends prefix keys and values to the attention of
  block ``i`` only (the sequence keeps its length), computed with the block's own ``qkv`` / ``q_norm`` /
  ``k_norm`` / ``norm`` / ``proj`` / layer-scale / drop-path modules and
  :func:`torch.nn.functional.scaled_dot_product_attention`.

:class:`PromptPool` holds keys and prompt values and selects, per input, the top-k entries by cosine
similarity between a query (the frozen [CLS] feature) and the keys.

Weights load only from a local file (:func:`create_vit`); nothing here downloads.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_mtl._weights import create_timm_model

__all__ = ["PromptPool", "PromptedViT", "build_prompted_vit", "create_vit"]

_NOT_FOUND = (
    "ViT weights not found at {path!r}. Nothing is downloaded automatically: fetch them once on a machine with "
    "network access, e.g. `timm.create_model({model_name!r}, pretrained=True)` and "
    "`torch.save(model.state_dict(), {path!r})` (or the original ViT-B/16 ImageNet-21k .npz), and point "
    "checkpoint_path at the file"
)


def create_vit(
    model_name: str = "vit_base_patch16_224", checkpoint_path: str | None = None, **kwargs: Any
) -> nn.Module:
    """A timm Vision Transformer without classifier (``num_classes=0``), weights from a local file only.

    Args:
        model_name: timm model name (a ``VisionTransformer`` with a class token).
        checkpoint_path: local weight file (``.pth``/``.bin``/``.safetensors`` state dict, or a JAX
            ``.npz`` of the original ViT release); None keeps the random initialization.
        **kwargs: passed to :func:`timm.create_model` (e.g. the tiny test ViT's ``img_size=16,
            patch_size=4, embed_dim=48, depth=5, num_heads=3``).

    Raises:
        FileNotFoundError: ``checkpoint_path`` does not exist (nothing is downloaded in its place).
        lightning_mtl._weights.WeightsMismatchError: the file does not fit the model.
    """
    return create_timm_model(model_name, checkpoint_path, not_found=_NOT_FOUND, **kwargs)


def build_prompted_vit(
    backbone: str | nn.Module = "vit_base_patch16_224",
    checkpoint_path: str | None = None,
    vit_kwargs: dict[str, Any] | None = None,
    project_prefix: bool = True,
) -> PromptedViT:
    """The frozen :class:`PromptedViT` of a prompt method, from YAML-friendly arguments.

    Args:
        backbone: timm model name for :func:`create_vit`, or a ready ViT module (then ``checkpoint_path``
            and ``vit_kwargs`` must be unset).
        checkpoint_path: local weight file (see :func:`create_vit`).
        vit_kwargs: extra :func:`timm.create_model` arguments (e.g. a tiny ViT for tests).
        project_prefix: see :class:`PromptedViT`.
    """
    if isinstance(backbone, nn.Module):
        if checkpoint_path is not None or vit_kwargs:
            raise ValueError("checkpoint_path / vit_kwargs only apply when backbone is a model name")
        vit = backbone
    else:
        vit = create_vit(backbone, checkpoint_path, **dict(vit_kwargs or {}))
    return PromptedViT(vit, freeze=True, project_prefix=project_prefix)


class PromptedViT(nn.Module):
    """A timm Vision Transformer run block by block with prompt tokens and attention prefixes.

    The ViT is frozen by default (``requires_grad=False``) and then kept in eval mode whatever
    ``train()`` says, so dropout and drop-path stay off while the prompts train. Gradients still flow
    *through* it to the prompts.

    Args:
        vit: a timm ``VisionTransformer`` with a class token whose blocks have a standard ``Attention``
            (``qkv``, ``num_heads``, ``head_dim``), e.g. from :func:`create_vit`.
        freeze: freeze the ViT's parameters and keep it in eval mode.
        project_prefix: how prefix keys / values enter the attention. True: they are tokens of the residual
            stream's width that the block's key / value projections map (the DualPrompt paper's
            ``MSA(h_Q, [p_k; h_K], [p_v; h_V])`` and the Si-Blurry / MVP code); False: they are used as
            keys / values directly, split into heads (the CODA-Prompt / OVOR code).
    """

    def __init__(self, vit: nn.Module, freeze: bool = True, project_prefix: bool = True) -> None:
        super().__init__()
        for name in ("patch_embed", "_pos_embed", "blocks", "norm"):
            if not hasattr(vit, name):
                raise TypeError(
                    f"PromptedViT needs a timm VisionTransformer, got {type(vit).__name__} without {name!r}"
                )
        if getattr(vit, "cls_token", None) is None:
            raise ValueError("PromptedViT needs a ViT with a class token (its [CLS] output is the query / feature)")
        self.vit: Any = vit  # a timm VisionTransformer, read by duck typing (checked above)
        self.frozen = bool(freeze)
        self.project_prefix = bool(project_prefix)
        if self.frozen:
            vit.requires_grad_(False)
            vit.eval()

    @property
    def embed_dim(self) -> int:
        return int(self.vit.embed_dim)

    @property
    def depth(self) -> int:
        return len(self.vit.blocks)

    @property
    def num_prefix_tokens(self) -> int:
        """Class (and register) tokens in front of the patch tokens; prompt tokens go right after them."""
        return int(self.vit.num_prefix_tokens)

    def train(self, mode: bool = True) -> PromptedViT:
        super().train(mode)
        if self.frozen:
            self.vit.eval()  # frozen features: no dropout / drop-path while the prompts train
        return self

    # -- passes -----------------------------------------------------------------------------------
    def forward_features(
        self,
        x: Tensor,
        prompts: Mapping[int, Tensor] | None = None,
        prefixes: Mapping[int, tuple[Tensor, Tensor]] | None = None,
    ) -> Tensor:
        """The normed token sequence ``[B, T, D]`` of a pass with prompts and/or prefixes.

        Args:
            x: images ``[B, C, H, W]``.
            prompts: block index -> prompt tokens ``[B, L, D]`` (or ``[L, D]``, shared) inserted after the
                class tokens at the input of that block. They stay in the sequence, so the output has
                ``num_prefix_tokens + sum(L) + num_patches`` tokens; a later insertion lands in front of an
                earlier one.
            prefixes: block index -> ``(keys, values)``, each ``[B, L, D]`` (or ``[L, D]``), prepended to
                that block's attention keys / values (see ``project_prefix``).

        Without prompts and prefixes this is exactly timm's ``forward_features``.
        """
        prompts, prefixes = dict(prompts or {}), dict(prefixes or {})
        for where in (prompts, prefixes):
            bad = [i for i in where if not 0 <= int(i) < self.depth]
            if bad:
                raise ValueError(f"prompt blocks {bad} outside 0 .. {self.depth - 1}")
        vit = self.vit
        x = vit.patch_embed(x)
        x = vit._pos_embed(x)
        x = vit.patch_drop(x)
        x = vit.norm_pre(x)
        batch, npt = x.shape[0], self.num_prefix_tokens
        for i, block in enumerate(vit.blocks):
            if i in prompts:
                p = _batched(prompts[i], batch).to(x.dtype)
                x = torch.cat([x[:, :npt], p, x[:, npt:]], dim=1)
            if i in prefixes:
                keys, values = prefixes[i]
                x = self._prefix_block(block, x, _batched(keys, batch).to(x.dtype), _batched(values, batch).to(x.dtype))
            else:
                x = block(x)
        return vit.norm(x)

    @torch.no_grad()
    def query(self, x: Tensor) -> Tensor:
        """The [CLS] feature ``[B, D]`` of a plain pass of the frozen ViT, without gradient (the
        prompt-selection query of L2P / DualPrompt / MVP)."""
        return self.forward_features(x)[:, 0].detach()

    # -- prefix tuning ----------------------------------------------------------------------------
    def _prefix_block(self, block: Any, x: Tensor, keys: Tensor, values: Tensor) -> Tensor:
        """timm's pre-norm ``Block.forward`` with prefix keys / values in its attention."""
        x = x + block.drop_path1(block.ls1(self._prefix_attention(block.attn, block.norm1(x), keys, values)))
        return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))

    def _prefix_attention(self, attn: Any, x: Tensor, keys: Tensor, values: Tensor) -> Tensor:
        """timm ``Attention.forward`` on ``x`` with ``keys`` / ``values`` prepended to its keys / values."""
        if not hasattr(attn, "qkv") or not hasattr(attn, "num_heads"):
            raise TypeError(f"prefix tuning needs timm's Attention (qkv, num_heads), got {type(attn).__name__}")
        batch, n, _ = x.shape
        heads, head_dim = attn.num_heads, attn.head_dim
        attn_dim = heads * head_dim
        length = keys.shape[1]
        if values.shape[1] != length:
            raise ValueError(f"prefix keys and values differ in length: {length} and {values.shape[1]}")
        gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
        q, k, v = attn.qkv(x).reshape(batch, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.project_prefix:
            # prefix tokens through the block's own key / value projections, then the key norm with the rest
            weight, bias = attn.qkv.weight, attn.qkv.bias
            w_k, w_v = weight[attn_dim : 2 * attn_dim], weight[2 * attn_dim :]
            b_k, b_v = (None, None) if bias is None else (bias[attn_dim : 2 * attn_dim], bias[2 * attn_dim :])
            pk = F.linear(keys, w_k, b_k).reshape(batch, length, heads, head_dim).transpose(1, 2)
            pv = F.linear(values, w_v, b_v).reshape(batch, length, heads, head_dim).transpose(1, 2)
            k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
            q, k = attn.q_norm(q), attn.k_norm(k)
        else:
            # raw keys / values in the attention's own space: free parameters, no norm applied to them
            q, k = attn.q_norm(q), attn.k_norm(k)
            pk = keys.reshape(batch, length, heads, head_dim).transpose(1, 2)
            pv = values.reshape(batch, length, heads, head_dim).transpose(1, 2)
            k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
        out = attn.norm(out.transpose(1, 2).reshape(batch, n, attn_dim))
        if gate is not None:
            out = out * gate
        return attn.proj_drop(attn.proj(out))


def _batched(t: Tensor, batch: int) -> Tensor:
    """``[L, D]`` shared tokens -> ``[B, L, D]``; ``[B, L, D]`` as is."""
    if t.dim() == 2:
        return t.unsqueeze(0).expand(batch, -1, -1)
    if t.dim() != 3 or t.shape[0] != batch:
        raise ValueError(f"prompt tokens must be [L, D] or [{batch}, L, D], got {tuple(t.shape)}")
    return t


class PromptPool(nn.Module):
    """A pool of ``pool_size`` (key, prompt) pairs, selected per input by cosine similarity to a query.

    ``prompts`` has shape ``[P, num_layers, L, D]`` for prompt tuning, ``[P, num_layers, 2, L, D]`` for
    prefix tuning (index 0 of the third axis: keys, 1: values): one key selects the prompts of every
    layer it covers (DualPrompt's e-prompt spans blocks 2-4 under one key).

    Args:
        pool_size: number of entries ``P``.
        length: tokens per layer ``L`` (for prefix tuning: keys, and as many values).
        embed_dim: token width ``D``.
        num_layers: layers one entry covers.
        prefix: prefix tuning (keys and values) instead of prompt tuning (tokens).
        key_dim: key width (the query's; ``embed_dim`` when None).
        init_range: keys and prompts start uniform in this range (``(-1, 1)``: the L2P / DualPrompt /
            Si-Blurry code).
    """

    def __init__(
        self,
        pool_size: int,
        length: int,
        embed_dim: int,
        num_layers: int = 1,
        prefix: bool = False,
        key_dim: int | None = None,
        init_range: tuple[float, float] = (-1.0, 1.0),
    ) -> None:
        super().__init__()
        if pool_size < 1 or length < 0 or num_layers < 1:
            raise ValueError(
                f"need pool_size >= 1, length >= 0, num_layers >= 1; got {pool_size}, {length}, {num_layers}"
            )
        self.pool_size, self.length = int(pool_size), int(length)
        self.num_layers, self.prefix = int(num_layers), bool(prefix)
        shape = (pool_size, num_layers, 2, length, embed_dim) if prefix else (pool_size, num_layers, length, embed_dim)
        self.keys = nn.Parameter(torch.empty(pool_size, key_dim or embed_dim).uniform_(*init_range))
        self.prompts = nn.Parameter(torch.empty(shape).uniform_(*init_range))

    def similarity(self, query: Tensor) -> Tensor:
        """Cosine similarity ``[B, P]`` of each query ``[B, D_k]`` to each key."""
        return F.normalize(query, dim=-1) @ F.normalize(self.keys, dim=-1).T

    def select(self, query: Tensor, top_k: int = 1) -> tuple[Tensor, Tensor]:
        """The ``top_k`` entries most cosine-similar to each query.

        Returns:
            ``(indices [B, top_k], similarity [B, P])``: indices by decreasing similarity, and the
            similarity to every key (differentiable in the keys; gather it at ``indices`` for a pull loss).
        """
        if not 1 <= top_k <= self.pool_size:
            raise ValueError(f"top_k must be in 1 .. {self.pool_size}, got {top_k}")
        sim = self.similarity(query)
        return sim.detach().topk(top_k, dim=1).indices, sim

    def forward(self, indices: Tensor) -> Tensor:
        """The prompts of the given entries: ``indices`` ``[B, k]`` -> ``[B, k, *prompts.shape[1:]]``
        (``[B]`` -> ``[B, *prompts.shape[1:]]``)."""
        return self.prompts[indices]
