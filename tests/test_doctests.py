"""Every docstring example in the package runs and prints what it shows.

The modules are found by scanning the sources for ``>>>``, so an example added to any module (or a
module moved to another folder) is tested without touching this file.
"""

import doctest
import importlib
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lightning_mtl"


def _modules_with_examples() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if ">>>" not in path.read_text(encoding="utf-8"):
            continue
        parts = path.relative_to(ROOT).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


MODULES = _modules_with_examples()


def test_the_scan_finds_the_examples():
    # a broken scan would otherwise pass by testing nothing
    assert len(MODULES) >= 8
    assert "lightning_mtl.multitask.delta_m" in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    # examples may draw random numbers: seed them and leave the other tests' stream alone
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, report=False)
    assert result.attempted > 0, f"{name} has '>>>' outside its docstrings: nothing ran"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed (printed above)"
