"""Public classes and functions of standard-library modules: the raw material of the embedded text corpora
(the embeddings family's pairs, the fine-tuning family's multi-label texts), read offline from the running
Python."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterable, Iterator


def public_members(module_names: Iterable[str]) -> Iterator[tuple[str, str, object]]:
    """``(module_name, name, obj)`` for every public class and routine of each importable module, modules in
    the given order and names sorted (a fixed order for one Python version); a module the running Python
    lacks is skipped."""
    for module_name in module_names:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # a stripped-down Python
            continue
        for name, obj in sorted(vars(module).items()):
            if not name.startswith("_") and (inspect.isclass(obj) or inspect.isroutine(obj)):
                yield module_name, name, obj
