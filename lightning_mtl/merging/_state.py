"""Reading the weights the merging methods combine: Lightning checkpoints, ``.pt`` / ``.safetensors`` state
dicts or in-memory mappings, and the slices of them (an encoder, a task head) a method needs."""

from __future__ import annotations

import os
from collections.abc import Mapping

from torch import Tensor, nn

from lightning_mtl.merging.task_vector import load_state_dict

__all__ = ["StateSource", "linear_head", "load_state", "select_prefix"]

StateSource = str | os.PathLike[str] | Mapping[str, Tensor]


def load_state(source: StateSource) -> dict[str, Tensor]:
    """A flat ``{name: tensor}`` dict from a path (Lightning ``.ckpt``, ``.pt``, ``.safetensors``) or a mapping.

    A checkpoint's ``state_dict`` entry is unwrapped; files are read on the CPU without unpickling code
    (``weights_only=True``), by :func:`~lightning_mtl.merging.task_vector.load_state_dict`.
    """
    if isinstance(source, Mapping):
        return {str(k): v for k, v in source.items()}
    return load_state_dict(source)  # the one checkpoint reader of the family (task vectors use it too)


def select_prefix(state: Mapping[str, Tensor], prefix: str, what: str = "weights") -> dict[str, Tensor]:
    """The entries of ``state`` under ``prefix``, with the prefix removed; a one-sentence error if there are none."""
    picked = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not picked:
        sample = ", ".join(list(state)[:3])
        raise KeyError(f"no {what} under the prefix {prefix!r} (the state dict starts with: {sample})")
    return picked


def linear_head(state: Mapping[str, Tensor], task: str, prefix: str = "heads.") -> nn.Linear:
    """The frozen linear head ``{prefix}{task}.weight`` / ``.bias`` of a checkpoint, as an ``nn.Linear``."""
    weights = select_prefix(state, f"{prefix}{task}.", what=f"head of task {task!r}")
    if set(weights) != {"weight", "bias"} or weights["weight"].dim() != 2:
        raise ValueError(f"the head of task {task!r} is not a linear layer (entries: {sorted(weights)})")
    out_features, in_features = weights["weight"].shape
    head = nn.Linear(in_features, out_features)
    head.load_state_dict({k: v.float() for k, v in weights.items()})
    head.requires_grad_(False)
    return head
