"""The toy-problem driver moved to :mod:`lightning_mtl.multitask.toy`, where it runs the gradient engine;
this old path re-exports it on first use (the aggregators never import ``multitask`` themselves)."""

from __future__ import annotations

import importlib
from typing import Any

_HOME = "lightning_mtl.multitask.toy"


def __getattr__(name: str) -> Any:
    # public names and ``__all__`` (for ``import *``) come from the new home, loaded on first use
    if name == "__all__" or not name.startswith("_"):
        return getattr(importlib.import_module(_HOME), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *importlib.import_module(_HOME).__all__])
