"""Name -> class registry of training-free merges, so configs can say ``method: ties``."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from torch import Tensor

from lightning_mtl.merging.task_vector import TaskVector

__all__ = ["Merge", "create_merge", "get_merge_class", "list_merges", "register_merge"]


class Merge:
    """A training-free merge: task vectors ``tau_1..tau_T`` in, one merged task vector ``tau_m`` out.

    The merged model is ``theta_0 + coef * tau_m`` (:meth:`TaskVector.apply_to`); ``default_coef`` is
    the coefficient the method's authors use when none is searched.
    """

    registry_name: str = ""
    default_coef: float = 1.0

    def __call__(self, vectors: Sequence[Mapping[str, Tensor]]) -> TaskVector:
        if not vectors:
            raise ValueError(f"{type(self).__name__} needs at least one task vector, got none")
        first = vectors[0]
        for i, other in enumerate(vectors[1:], start=1):
            for key in first:
                if key not in other:
                    raise KeyError(f"{key!r} is in task vector 0 but not in task vector {i}")
                if other[key].shape != first[key].shape:
                    raise ValueError(
                        f"{key!r} has shape {tuple(first[key].shape)} in task vector 0 and {tuple(other[key].shape)} in task vector {i}"
                    )
            for key in other:
                if key not in first:
                    raise KeyError(f"{key!r} is in task vector {i} but not in task vector 0")
        return self.merge(vectors)

    def merge(self, vectors: Sequence[Mapping[str, Tensor]]) -> TaskVector:
        """The merged task vector of ``vectors`` (same keys and shapes, checked by ``__call__``)."""
        raise NotImplementedError


_REGISTRY: dict[str, type[Merge]] = {}
M = TypeVar("M", bound=type[Merge])


def register_merge(*names: str) -> Callable[[M], M]:
    """Class decorator: ``@register_merge("ties")``. The first name is the canonical one."""

    def wrap(cls: M) -> M:
        for name in names:
            key = name.lower()
            if key in _REGISTRY and _REGISTRY[key] is not cls:
                raise ValueError(f"merge name {name!r} is already registered to {_REGISTRY[key].__name__}")
            _REGISTRY[key] = cls
        cls.registry_name = names[0].lower()
        return cls

    return wrap


def list_merges() -> list[str]:
    """Canonical names of every registered merge, sorted."""
    return sorted({cls.registry_name for cls in _REGISTRY.values()})


def get_merge_class(name: str) -> type[Merge]:
    """The class registered under ``name`` (case-insensitive)."""
    try:
        return _REGISTRY[name.lower()]
    except KeyError:
        close = difflib.get_close_matches(name.lower(), list(_REGISTRY), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ValueError(f"unknown merge {name!r}; {hint}known merges: {', '.join(list_merges())}") from None


def create_merge(name: str, **kwargs: Any) -> Merge:
    """Build a merge from its registered name and keyword arguments (``create_merge("ties", k=20)``)."""
    return get_merge_class(name)(**kwargs)
