"""Per-head scale and offset on the attention heads of a Hugging Face decoder, installed as hooks.

LoFiT edits the output ``z`` of every attention head ``(l, i)`` just before the attention's output
projection: ``z' = (1 + A_{l,i}) * z + v_{l,i}`` with ``A, v`` of size ``head_dim``. The input of the output
projection (``o_proj`` in Llama / Qwen / Gemma / Mistral, ``c_proj`` in GPT-2, ``dense`` in Falcon / Phi /
GPT-NeoX, ``out_proj`` elsewhere) is the concatenation of the heads' outputs, ``[..., heads * head_dim]``,
so a forward pre-hook on that projection sees exactly the ``z`` of the paper, without a forked modelling
file. One hook per layer edits all its heads with one fused tensor operation.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["AttentionLayout", "LoFiTIntervention", "find_attention_projections", "load_intervention"]

# names of the attention block and of its output projection in the Hugging Face decoders
_ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
_PROJECTION_NAMES = ("o_proj", "c_proj", "dense", "out_proj")
_FORMAT_VERSION = 1


class AttentionLayout:
    """Where the heads of a decoder are: the output projection of each layer's attention, in layer order.

    Args:
        projections: the output projections, one per layer.
        num_heads: attention (query) heads per layer.
        head_dim: width of one head's output.
    """

    def __init__(self, projections: list[nn.Module], num_heads: int, head_dim: int) -> None:
        self.projections = projections
        self.num_heads = num_heads
        self.head_dim = head_dim

    @property
    def num_layers(self) -> int:
        return len(self.projections)


def _input_width(projection: nn.Module) -> int | None:
    if isinstance(projection, nn.Linear):
        return projection.in_features
    weight = getattr(projection, "weight", None)
    if getattr(projection, "nx", None) is not None and weight is not None:  # GPT-2's Conv1D: weight [in, out]
        return int(weight.shape[0])
    return None


def find_attention_projections(model: nn.Module) -> AttentionLayout:
    """The attention output projections of a Hugging Face decoder and its head geometry.

    Args:
        model: a ``transformers`` causal language model (or its base model) with a ``config``.

    Returns:
        The layout: one projection per layer, the number of heads and the head width.

    Raises:
        ValueError: the model has no attention output projection where the supported decoders keep it, or
            its width is not a multiple of the number of heads.
    """
    projections = []
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] not in _ATTENTION_NAMES:
            continue
        for child in _PROJECTION_NAMES:
            projection = getattr(module, child, None)
            if isinstance(projection, nn.Module) and _input_width(projection) is not None:
                projections.append(projection)
                break
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    num_heads = getattr(config, "num_attention_heads", None)
    if not projections or num_heads is None:
        missing = "a `num_attention_heads` in its config" if projections else (
            f"an attention output projection ({' / '.join(_PROJECTION_NAMES)} inside a module named "
            f"{' / '.join(_ATTENTION_NAMES)})")  # fmt: skip
        raise ValueError(f"LoFiT needs {missing}, and {type(model).__name__} has none")
    width = _input_width(projections[0])
    assert width is not None
    if width % int(num_heads):
        raise ValueError(
            f"the attention output projection takes {width} features, not a multiple of the {num_heads} heads"
        )
    return AttentionLayout(projections, int(num_heads), width // int(num_heads))


class LoFiTIntervention(nn.Module):
    """The scales ``A`` and offsets ``v`` of every attention head, applied as ``z' = (1 + A) * z + v``.

    Yin, Ye and Durrett, "LoFiT: Localized Fine-tuning on LLM Representations", NeurIPS 2024. ``scale``
    (``A``) and ``offset`` (``v``) are ``[layers, heads, head_dim]`` parameters; ``head_mask``
    (``[layers, heads]``, a buffer) selects the heads they act on (all heads when localizing, the top-K when
    tuning), so a head outside the mask is left exactly as it is and receives no gradient. All zeros is the
    identity, bit for bit: ``1 * z + 0 == z``.

    The edited heads are computed in the parameters' dtype and cast back to the activations' dtype, so the
    hook works in float32, under autocast and on a model held in bfloat16.

    Args:
        num_layers: layers of the decoder.
        num_heads: attention heads per layer.
        head_dim: width of one head.
    """

    head_mask: Tensor

    def __init__(self, num_layers: int, num_heads: int, head_dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(num_layers, num_heads, head_dim))
        self.offset = nn.Parameter(torch.zeros(num_layers, num_heads, head_dim))
        self.register_buffer("head_mask", torch.ones(num_layers, num_heads))
        self.enabled = True
        self._handles: list[Any] = []

    @property
    def shape(self) -> tuple[int, int, int]:
        layers, heads, dim = self.scale.shape
        return int(layers), int(heads), int(dim)

    def edit(self, layer: int, z: Tensor) -> Tensor:
        """``(1 + A_l) * z + v_l`` on the heads of ``head_mask``; ``z`` is ``[..., heads * head_dim]``."""
        _, heads, dim = self.shape
        mask = self.head_mask[layer].unsqueeze(-1).to(self.scale.dtype)
        factor = 1 + self.scale[layer] * mask
        offset = self.offset[layer] * mask
        # one fused multiply-add over all heads of the layer; the per-head slices of the official code
        # become the [heads, head_dim] broadcast
        edited = torch.addcmul(offset, z.unflatten(-1, (heads, dim)), factor)
        return edited.flatten(-2).to(z.dtype)

    def _hook(self, layer: int, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if not self.enabled:
            return None
        return (self.edit(layer, args[0]), *args[1:])

    def attach(self, model: nn.Module) -> LoFiTIntervention:
        """Install one forward pre-hook per layer on ``model``'s attention output projections.

        Raises:
            ValueError: the model's layout differs from this intervention's (layers, heads, head width),
                or it is attached already.
        """
        if self._handles:
            raise ValueError("this LoFiT intervention is attached to a model already; call detach() first")
        layout = find_attention_projections(model)
        found = (layout.num_layers, layout.num_heads, layout.head_dim)
        if found != self.shape:
            raise ValueError(f"the model has (layers, heads, head_dim) = {found}, the intervention {self.shape}")
        self._handles = [p.register_forward_pre_hook(functools.partial(self._hook, layer))
                         for layer, p in enumerate(layout.projections)]  # fmt: skip
        return self

    def detach(self) -> None:
        """Remove the hooks; the model is the base model again."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @contextmanager
    def disabled(self) -> Iterator[LoFiTIntervention]:
        """The base model inside the block (DPO's reference model) without removing the hooks."""
        before, self.enabled = self.enabled, False
        try:
            yield self
        finally:
            self.enabled = before

    def head_norms(self, which: str = "scale") -> Tensor:
        """``[layers, heads]`` L2 norms of ``scale`` (LoFiT's importance score) or of ``offset``."""
        values = self.scale if which == "scale" else self.offset
        return values.detach().float().norm(dim=-1) * self.head_mask

    def rank_heads(self, k: int | None = None) -> list[tuple[int, int]]:
        """``(layer, head)`` pairs by decreasing ``||A||_2``, the first ``k`` (all when None); ties keep
        the (layer, head) order."""
        norms = self.head_norms("scale").flatten()
        order = torch.sort(norms, descending=True, stable=True).indices
        heads = self.shape[1]
        return [(int(i) // heads, int(i) % heads) for i in order[: k if k is not None else len(order)]]

    def select_heads(self, heads: Sequence[Sequence[int]]) -> None:
        """Restrict the intervention to ``heads`` (``(layer, head)`` pairs): the mask becomes those heads."""
        layers, num_heads, _ = self.shape
        mask = torch.zeros(layers, num_heads)
        for layer, head in heads:
            if not (0 <= layer < layers and 0 <= head < num_heads):
                raise ValueError(f"head ({layer}, {head}) is outside a model of {layers} layers x {num_heads} heads")
            mask[layer, head] = 1.0
        self.head_mask.copy_(mask)

    def selected_heads(self) -> list[tuple[int, int]]:
        """The ``(layer, head)`` pairs of the mask, in (layer, head) order."""
        return [(int(layer), int(head)) for layer, head in self.head_mask.nonzero().tolist()]

    def save(self, path: str | os.PathLike[str], heads: Sequence[Sequence[int]] | None = None) -> None:
        """Write the intervention of ``heads`` (default: the masked heads) to a small file.

        Only the listed heads' ``A`` and ``v`` rows are stored (``K x head_dim`` numbers each), in the
        order given, so a ranking saved by the localization stage keeps its order.
        """
        chosen = [tuple(map(int, h)) for h in (heads if heads is not None else self.selected_heads())]
        index = torch.tensor(chosen, dtype=torch.long).reshape(-1, 2)
        layers, num_heads, dim = self.shape
        payload = {
            "lofit_format": _FORMAT_VERSION,
            "shape": [layers, num_heads, dim],
            "heads": index,
            "scale": self.scale.detach()[index[:, 0], index[:, 1]].float().cpu().clone(),
            "offset": self.offset.detach()[index[:, 0], index[:, 1]].float().cpu().clone(),
        }
        torch.save(payload, os.fspath(path))

    @staticmethod
    def read(path: str | os.PathLike[str]) -> dict[str, Any]:
        """The content of a file written by :meth:`save` (loaded without unpickling objects).

        Raises:
            FileNotFoundError: no file at ``path``.
            ValueError: the file is not a LoFiT intervention.
        """
        if not os.path.exists(os.fspath(path)):
            raise FileNotFoundError(f"no LoFiT intervention file at '{os.fspath(path)}'")
        payload = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
        if not isinstance(payload, dict) or payload.get("lofit_format") != _FORMAT_VERSION:
            raise ValueError(
                f"'{os.fspath(path)}' is not a LoFiT intervention file (written by LoFiTIntervention.save)"
            )
        return payload

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> LoFiTIntervention:
        """The intervention saved at ``path``: its heads' ``A`` and ``v``, zeros and masked out elsewhere."""
        payload = cls.read(path)
        intervention = cls(*payload["shape"])
        heads = payload["heads"]
        with torch.no_grad():
            intervention.scale[heads[:, 0], heads[:, 1]] = payload["scale"]
            intervention.offset[heads[:, 0], heads[:, 1]] = payload["offset"]
        intervention.select_heads(heads.tolist())
        return intervention


def load_intervention(model: nn.Module, path: str | os.PathLike[str]) -> LoFiTIntervention:
    """Install the intervention saved at ``path`` on a base ``model`` for inference.

    Args:
        model: the decoder the intervention was trained on (same layers, heads and head width).
        path: a file written by :meth:`LoFiTIntervention.save` (or by the ``LoFiT`` module).

    Returns:
        The attached intervention, moved to the model's device; ``detach()`` removes it.
    """
    intervention = LoFiTIntervention.from_file(path)
    parameter = next(model.parameters(), None)
    if parameter is not None:
        intervention.to(parameter.device)
    return intervention.attach(model)
