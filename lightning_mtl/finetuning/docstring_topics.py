"""An embedded text classification task: the topic of a Python standard library docstring."""

from __future__ import annotations

import importlib
import inspect
import re

__all__ = ["TOPICS", "docstring_topics"]

# topic -> standard library modules whose docstrings carry it
TOPICS: dict[str, tuple[str, ...]] = {
    "text": ("string", "re", "textwrap", "difflib", "html", "codecs", "unicodedata"),
    "numbers": ("math", "statistics", "fractions", "decimal", "random", "cmath", "numbers"),
    "files": ("os", "shutil", "pathlib", "glob", "tempfile", "filecmp", "zipfile", "tarfile"),
    "network": ("socket", "http.client", "urllib.request", "urllib.parse", "smtplib", "ftplib", "ssl", "email.message"),
}
_SIGNATURE = re.compile(r"^\w[\w.]*\(.*\)")


def _members(module: object) -> list[object]:
    name = getattr(module, "__name__", "")
    found: list[object] = []
    for attr, value in sorted(vars(module).items()):
        if attr.startswith("_"):
            continue
        if inspect.isclass(value) and value.__module__ == name:
            found.append(value)
            found += [v for k, v in sorted(vars(value).items()) if not k.startswith("_") and callable(v)]
        elif callable(value) and getattr(value, "__module__", None) in (name, None):
            found.append(value)
    return found


def _first_paragraph(obj: object) -> str | None:
    paragraphs = [p for p in (inspect.getdoc(obj) or "").split("\n\n") if p.strip()]
    # C functions open with their signature ("cos(x)"): that names the module, not the topic
    paragraphs = [p for p in paragraphs if not _SIGNATURE.match(p.strip())]
    return " ".join(paragraphs[0].split()) if paragraphs else None


def docstring_topics(min_chars: int = 20, max_chars: int = 300) -> list[tuple[str, str]]:
    """``(text, topic)`` pairs: the first paragraph of every public function's, class's and method's docstring
    in the modules of :data:`TOPICS`, deduplicated and sorted (deterministic for one Python version; the
    counts differ a little between versions: about 110 to 270 per topic on CPython 3.11).

    Args:
        min_chars: shortest paragraph kept.
        max_chars: longest paragraph kept.
    """
    pairs: dict[str, str] = {}
    for topic, modules in TOPICS.items():
        for module_name in modules:
            for member in _members(importlib.import_module(module_name)):
                text = _first_paragraph(member)
                # a paragraph found under two topics would be an ambiguous label: the first topic keeps it
                if text is not None and min_chars <= len(text) <= max_chars:
                    pairs.setdefault(text, topic)
    return sorted(pairs.items(), key=lambda pair: (pair[1], pair[0]))
