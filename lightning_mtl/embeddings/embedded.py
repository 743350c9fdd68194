"""An offline pair corpus built from text that ships with Python: three "domains" of (anchor, positive) pairs.

- ``functions``: a standard-library function's spoken name (``"os path join"``) <-> the first sentence of its
  docstring;
- ``classes``: a standard-library class or exception name <-> the first sentence of its docstring;
- ``paraphrases``: templated question paraphrases (``"how do I sort a list"`` <-> ``"what is the way to
  sort a list"``).

The docstrings belong to the running Python, so the pairs change a little between Python versions; within
one version they are fixed (sorted, then shuffled with the given seed).
"""

from __future__ import annotations

import inspect
import random
import re

from lightning_mtl._stdlib_docs import public_members

__all__ = ["DOMAINS", "embedded_pairs"]

DOMAINS = ("functions", "classes", "paraphrases")

_MODULES = (
    "base64", "bisect", "calendar", "collections", "colorsys", "copy", "csv", "datetime", "difflib", "fnmatch",
    "fractions", "functools", "glob", "gzip", "hashlib", "heapq", "html", "inspect", "io", "ipaddress",
    "itertools", "json", "keyword", "linecache", "locale", "logging", "math", "mimetypes", "operator",
    "os", "os.path", "pathlib", "pickle", "pprint", "queue", "random", "re", "shlex", "shutil", "socket",
    "statistics", "string", "struct", "tarfile", "tempfile", "textwrap", "threading", "time", "tokenize",
    "traceback", "types", "unicodedata", "urllib.parse", "uuid", "warnings", "weakref", "zipfile",
    "zlib",
)  # fmt: skip

_QUESTIONS = (
    ("how do I {verb} {noun}", "what is the way to {verb} {noun}"),
    ("what is the fastest way to {verb} {noun}", "quickest method to {verb} {noun}"),
    ("can you show me how to {verb} {noun}", "please explain how one would {verb} {noun}"),
    ("is it possible to {verb} {noun}", "can one {verb} {noun} at all"),
    ("why does it fail when I {verb} {noun}", "reasons an attempt to {verb} {noun} goes wrong"),
)
_VERBS = ("sort", "copy", "reverse", "merge", "split", "filter", "count", "compress", "encode", "parse",
          "print", "save", "load", "compare", "search")  # fmt: skip
_NOUNS = ("a list", "a string", "a file", "a dictionary", "two arrays", "a date", "a number", "a table",
          "an image", "a folder", "a json document", "a url")  # fmt: skip


def _first_sentence(doc: str | None) -> str | None:
    if not doc:
        return None
    text = " ".join(doc.strip().split("\n\n")[0].split())
    sentence = re.split(r"(?<=[.!?])\s", text)[0].strip()
    # signature lines ("f(x) -> y") and one-word docstrings say nothing a name does not
    if len(sentence.split()) < 4 or "(" in sentence.split()[0]:
        return None
    return sentence


def _spoken(name: str) -> str:
    """``"os.path.splitext"`` -> ``"os path splitext"``, ``"JSONDecodeError"`` -> ``"json decode error"``."""
    name = re.sub(r"([a-z])([A-Z])", r"\1 \2", name)
    name = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1 \2", name)
    return " ".join(name.replace(".", " ").replace("_", " ").lower().split())


def _docstring_pairs(want_class: bool) -> list[tuple[str, str]]:
    pairs, seen = [], set()
    for module_name, name, obj in public_members(_MODULES):
        if inspect.isclass(obj) != want_class:
            continue
        sentence = _first_sentence(inspect.getdoc(obj) if want_class else obj.__doc__)
        if sentence is None or sentence in seen:  # re-exports share one docstring
            continue
        seen.add(sentence)
        pairs.append((_spoken(f"{module_name}.{name}"), sentence))
    return pairs


def _paraphrases() -> list[tuple[str, str]]:
    return [
        (question.format(verb=verb, noun=noun), paraphrase.format(verb=verb, noun=noun))
        for question, paraphrase in _QUESTIONS
        for verb in _VERBS
        for noun in _NOUNS
    ]


def embedded_pairs(per_domain: int = 300, seed: int = 0) -> list[dict[str, str]]:
    """Rows ``{"anchor", "positive", "domain"}`` of the three domains, at most ``per_domain`` each, shuffled.

    Args:
        per_domain: cap per domain (the docstring domains hold a few hundred pairs).
        seed: shuffles each domain before the cap and the rows after it.
    """
    rng = random.Random(seed)
    rows = []
    for domain, pairs in zip(DOMAINS, (_docstring_pairs(False), _docstring_pairs(True), _paraphrases())):
        rng.shuffle(pairs)
        rows += [{"anchor": a, "positive": p, "domain": domain} for a, p in pairs[:per_domain]]
    rng.shuffle(rows)
    return rows
