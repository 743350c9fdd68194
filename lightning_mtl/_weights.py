"""The one loader of local timm weights (floor 0: imports no family; timm only when a model is built).

:func:`~lightning_mtl.architectures.timm_encoder` (shared encoders) and
:func:`~lightning_mtl.continual.create_vit` (continual ViTs) both build their timm models here, so a
weight file is read, adapted and checked the same way everywhere, and nothing is ever downloaded.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["WeightsMismatchError", "create_timm_model"]


class WeightsMismatchError(ValueError, RuntimeError):
    """A local weight file does not fit the model (missing or misshapen entries).

    A ``ValueError`` (a bad argument) and a ``RuntimeError`` (what ``load_state_dict`` raises), so
    handlers written for either keep working.
    """


def create_timm_model(
    model_name: str, checkpoint_path: str | os.PathLike[str] | None = None, *, not_found: str, **kwargs: Any
) -> nn.Module:
    """``timm.create_model(model_name, num_classes=0, **kwargs)`` with weights from a local file only.

    Without ``checkpoint_path`` the weights stay random. With it, the file is a ``.pth`` / ``.bin`` /
    ``.safetensors`` state dict, read by timm's own reader (a ``state_dict`` / ``model`` entry of a
    training checkpoint is unwrapped, an EMA entry preferred, a DDP ``module.`` prefix removed), or a JAX
    ``.npz`` where the model has its own loader (the original ViT release). A state dict goes through the
    checkpoint filter of the model's timm module where it has one (what timm's own pretrained loading
    applies, e.g. ViT position embeddings resampled to another image size); entries the model has no
    room for (a classifier) are dropped, and every entry of the model must be in the file.

    Args:
        model_name: a name from ``timm.list_models()``.
        checkpoint_path: local weight file; ``~`` is expanded.
        not_found: the error message when ``checkpoint_path`` is not a file, a ``str.format`` template
            with the fields ``{path}`` and ``{model_name}`` (each caller says where to get its weights).
        **kwargs: further arguments of ``timm.create_model``; ``num_classes`` is forced to 0 and
            ``pretrained`` is ignored.

    Raises:
        FileNotFoundError: ``checkpoint_path`` is not a file (nothing is downloaded in its place).
        WeightsMismatchError: the file lacks entries of the model or holds misshapen ones.
    """
    import timm  # the heavy import happens only when a timm model is built

    kwargs["num_classes"] = 0
    kwargs.pop("pretrained", None)
    path = None if checkpoint_path is None else Path(checkpoint_path).expanduser()
    if path is not None and not path.is_file():
        raise FileNotFoundError(not_found.format(path=str(path), model_name=model_name))
    model = timm.create_model(model_name, pretrained=False, **kwargs)
    if path is None:
        return model
    if path.suffix == ".npz":
        model.load_pretrained(str(path))  # type: ignore[operator]  # timm's JAX loader (hidden by nn.Module.__getattr__); none: AttributeError
        return model
    state = timm.models.load_state_dict(str(path))
    # timm's own pretrained loading passes the model module's filter; reading the file ourselves keeps the
    # check below (timm's loading turns strictness off when the classifier is dropped)
    checkpoint_filter = getattr(importlib.import_module(type(model).__module__), "checkpoint_filter_fn", None)
    if checkpoint_filter is not None:
        state = checkpoint_filter(state, model)
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k in own}
    missing = sorted(set(own) - set(state))
    if missing:
        raise WeightsMismatchError(
            f"{path} does not fit {model_name!r}: missing {len(missing)} keys, e.g. {missing[:3]}"
        )
    try:
        model.load_state_dict(state)
    except RuntimeError as error:  # a shape that differs
        raise WeightsMismatchError(f"{path} does not fit {model_name!r}: {error}") from error
    return model
