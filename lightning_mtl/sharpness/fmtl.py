"""F-MTL moved to :mod:`lightning_mtl.multitask.fmtl`, beside the gradient engine it drives; this old path
re-exports it on first use, so that importing ``lightning_mtl.sharpness`` does not import ``multitask``."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["FMTL"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("lightning_mtl.multitask.fmtl"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
