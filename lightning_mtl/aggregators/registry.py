"""Name -> class registry of aggregators, so configs can say ``aggregator: pcgrad``."""

from __future__ import annotations

from typing import Callable, TypeVar

from lightning_mtl.aggregators.base import Aggregator

_REGISTRY: dict[str, type[Aggregator]] = {}
T = TypeVar("T", bound=type[Aggregator])


def register_aggregator(*names: str) -> Callable[[T], T]:
    """Class decorator: ``@register_aggregator("pcgrad")``. The first name is the canonical one."""

    def wrap(cls: T) -> T:
        for name in names:
            key = name.lower()
            if key in _REGISTRY and _REGISTRY[key] is not cls:
                raise ValueError(f"aggregator name {name!r} is already registered to {_REGISTRY[key].__name__}")
            _REGISTRY[key] = cls
        cls.registry_name = names[0].lower()  # type: ignore[attr-defined]
        return cls

    return wrap


def list_aggregators() -> list[str]:
    """Canonical names of every registered aggregator, sorted."""
    return sorted({cls.registry_name for cls in _REGISTRY.values()})  # type: ignore[attr-defined]


def get_aggregator_class(name: str) -> type[Aggregator]:
    try:
        return _REGISTRY[name.lower()]
    except KeyError:
        known = ", ".join(list_aggregators())
        raise ValueError(f"unknown aggregator {name!r}; known aggregators: {known}") from None


def create_aggregator(name: str, **kwargs: object) -> Aggregator:
    """Build an aggregator from its registered name and keyword arguments."""
    return get_aggregator_class(name)(**kwargs)
