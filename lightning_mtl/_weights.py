"""The one loader of local timm weights (floor 0: imports no family; timm only when a model is built).

:func:`~lightning_mtl.architectures.timm_encoder` (shared encoders) and
:func:`~lightning_mtl.continual.create_vit` (continual ViTs) both build their timm models here, so a
weight file is read, adapted and checked the same way everywhere, and nothing is ever downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["WeightsMismatchError", "create_timm_model"]


class WeightsMismatchError(ValueError, RuntimeError):
    """A local weight file does not fit the model (missing, unexpected or misshapen entries).

    A ``ValueError`` (a bad argument) and a ``RuntimeError`` (what ``load_state_dict`` raises), so
    handlers written for either keep working.
    """


def create_timm_model(
    model_name: str, checkpoint_path: str | os.PathLike[str] | None = None, *, not_found: str, **kwargs: Any
) -> nn.Module:
    """``timm.create_model(model_name, num_classes=0, **kwargs)`` with weights from a local file only.

    Without ``checkpoint_path`` the weights stay random. With it, timm itself reads the file through its
    pretrained-weights path, with the file taking the place of every URL or hub entry: a
    ``.pth`` / ``.bin`` / ``.safetensors`` state dict (a ``state_dict`` / ``model`` entry of a training
    checkpoint is unwrapped, an EMA entry preferred), or a JAX ``.npz`` where the model has its own loader
    (the original ViT release). The model's checkpoint filter runs (e.g. ViT position embeddings
    resampled to another image size), input channels are adapted to ``in_chans``, a classifier in the
    file is dropped, and the rest loads strictly.

    Args:
        model_name: a name from ``timm.list_models()``.
        checkpoint_path: local weight file; ``~`` is expanded.
        not_found: the error message when ``checkpoint_path`` is not a file, a ``str.format`` template
            with the fields ``{path}`` and ``{model_name}`` (each caller says where to get its weights).
        **kwargs: further arguments of ``timm.create_model``; ``num_classes`` is forced to 0 and
            ``pretrained`` is ignored.

    Raises:
        FileNotFoundError: ``checkpoint_path`` is not a file (nothing is downloaded in its place).
        WeightsMismatchError: the file's entries do not fit the model.
    """
    import timm  # the heavy import happens only when a timm model is built

    kwargs["num_classes"] = 0
    kwargs.pop("pretrained", None)
    if checkpoint_path is None:
        return timm.create_model(model_name, pretrained=False, **kwargs)
    path = Path(checkpoint_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(not_found.format(path=str(path), model_name=model_name))
    # `file` has priority over the url / hub entries of the pretrained config, so timm reads this file and
    # never the network; a .npz goes through the model's own JAX loader (`custom_load`)
    overlay = dict(file=str(path), source="", state_dict=None, custom_load=path.suffix == ".npz")
    try:
        return timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except RuntimeError as error:
        if "state_dict" not in str(error):  # torch's load_state_dict names itself; anything else is not ours
            raise
        raise WeightsMismatchError(f"{path} does not fit {model_name!r}: {error}") from error
