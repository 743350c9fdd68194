"""Name -> class registry of aggregators, so configs can say ``aggregator: pcgrad``."""

from __future__ import annotations

import difflib
import typing
from collections.abc import Callable
from typing import Any, TypeVar

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
        raise ValueError(_unknown(name)) from None


def _unknown(name: str) -> str:
    close = difflib.get_close_matches(name.lower(), list(_REGISTRY), n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return f"unknown aggregator {name!r}; {hint}known aggregators: {', '.join(list_aggregators())}"


def create_aggregator(name: str, **kwargs: object) -> Aggregator:
    """Build an aggregator from its registered name and keyword arguments."""
    return get_aggregator_class(name)(**kwargs)


class AggregatorName(str):
    """A registered aggregator name (a plain ``str`` in Python; configs check it when they are parsed)."""


def describe_names(bases: tuple[type, ...] = (Aggregator,)) -> str:
    """Every registered name of a subclass of ``bases`` with its class, aliases after a slash:
    ``"cagrad -> CAGrad, ls/ew/linear -> LinearScalarization, ..."`` (what the command line's help lists)."""
    names: dict[type[Aggregator], list[str]] = {}
    for name, cls in sorted(_REGISTRY.items()):
        if issubclass(cls, bases):
            names.setdefault(cls, []).append(name)
    entries = []
    for cls, aliases in names.items():
        canonical = cls.registry_name  # type: ignore[attr-defined]
        ordered = [canonical, *(name for name in aliases if name != canonical)]
        entries.append(f"{'/'.join(ordered)} -> {cls.__name__}")
    return ", ".join(sorted(entries))


def _aggregator_bases(typehint: Any) -> set[type]:
    """The aggregator classes a type hint accepts (``Aggregator | AggregatorName``, ``Optional[PCGrad]``):
    a name stands for any aggregator."""
    if typehint is AggregatorName:
        return {Aggregator}
    if isinstance(typehint, type) and issubclass(typehint, Aggregator):
        return {typehint}
    return set().union(*(_aggregator_bases(arg) for arg in typing.get_args(typehint)))


def _check_name(value: str) -> AggregatorName:
    get_aggregator_class(value)  # the one-line error with the close matches
    return AggregatorName(value)


def _teach_jsonargparse() -> None:
    """Configs take the registered names wherever an aggregator class path goes (``class_path: cagrad``
    with ``init_args``, ``--model.aggregator cagrad --model.aggregator.c 0.4``), and a bare name is
    checked when the config is parsed. jsonargparse has no hook for names, so its class-name lookup
    is wrapped: registered names resolve to their class, everything else is left to it. Its help, which
    lists the known subclasses of an argument's type, is wrapped alike to list the registered names
    next to them (``--model.help MultiTaskModule``), read from the registry when the help is printed."""
    from jsonargparse import _typehints
    from jsonargparse.typing import register_type

    register_type(AggregatorName, str, _check_name)
    lookup = _typehints.resolve_class_path_by_name
    if getattr(lookup, "_knows_aggregator_names", False):
        return

    extra_help = _typehints.ActionTypeHint.extra_help

    def help_with_names(action: Any) -> str:
        text = extra_help(action)
        bases = _aggregator_bases(getattr(action, "_typehint", None))
        listed = describe_names(tuple(bases)) if bases else ""
        return f"{text}, registered names: {listed}" if listed else text

    _typehints.ActionTypeHint.extra_help = help_with_names  # type: ignore[method-assign]

    def resolve(cls: type | tuple[type], name: str) -> str:  # the signature of the lookup it wraps
        path = lookup(cls, name)  # calls back here for each type of a tuple
        if "." in path or isinstance(cls, tuple) or not (isinstance(cls, type) and issubclass(cls, Aggregator)):
            return path
        if name.lower() not in _REGISTRY:
            raise ValueError(_unknown(name))
        found = _REGISTRY[name.lower()]
        return f"{found.__module__}.{found.__qualname__}"

    resolve._knows_aggregator_names = True  # type: ignore[attr-defined]
    _typehints.resolve_class_path_by_name = resolve


_teach_jsonargparse()
