"""Name -> factory registry of ``peft`` adapters, so configs can say ``adapter: lora``."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["PEFT_INSTALL", "create_adapter", "list_adapters", "register_adapter"]

PEFT_INSTALL = "the PEFT adapters need the optional `peft` package: pip install 'lightning-mtl[peft]'"

# name -> function(model, **kwargs) returning the model wrapped by peft (only the adapter trainable)
_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
F = Callable[..., nn.Module]


def register_adapter(name: str) -> Callable[[F], F]:
    """Function decorator: ``@register_adapter("lora")`` on ``wrap(model, **kwargs) -> peft model``."""

    def wrap(function: F) -> F:
        key = name.lower()
        if key in _REGISTRY and _REGISTRY[key] is not function:
            raise ValueError(f"adapter name {name!r} is already registered")
        _REGISTRY[key] = function
        return function

    return wrap


def list_adapters() -> list[str]:
    """Names of every registered adapter, sorted."""
    return sorted(_REGISTRY)


def create_adapter(name: str, model: nn.Module, **kwargs: Any) -> nn.Module:
    """Wrap ``model`` with the adapter ``name``: its own weights frozen, only the adapter's trainable."""
    try:
        function = _REGISTRY[name.lower()]
    except KeyError:
        close = difflib.get_close_matches(name.lower(), list(_REGISTRY), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ValueError(f"unknown adapter {name!r}; {hint}known adapters: {', '.join(list_adapters())}") from None
    return function(model, **kwargs)


def import_peft() -> Any:
    """The ``peft`` package, or an ImportError that names the extra."""
    try:
        import peft
    except ImportError as error:
        raise ImportError(PEFT_INSTALL) from error
    return peft
