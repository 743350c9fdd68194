"""The package's import structure: lazy top-level imports, families side by side above floor 0 with no
folder-level import loop, and every collective in ``lightning_mtl._distributed``.

Floor 0 is the package's private top-level modules (``lightning_mtl/_*.py``): anyone may import them
and they import no family. The entry points (``__init__``, ``__main__``, ``cli``, ``report``) sit on
top: they may import families, and no family imports them. Between the folders (``aggregators``,
``multitask``, ``callbacks``, ...) the import graph has no cycle. Edges are ``import`` statements found
with ``ast`` anywhere in a module, function-level ones included; the lazy re-export tables of
``lightning_mtl`` and ``lightning_mtl.callbacks`` are strings looked up on first access, not imports.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lightning_mtl"
ENTRY_POINTS = {"__init__", "__main__", "cli", "report"}


def _loaded_after(statement: str) -> dict:
    """Modules in ``sys.modules`` after ``statement`` in a fresh interpreter that imports this checkout."""
    probe = f"import json, sys\n{statement}\nprint(json.dumps(sorted(m for m in sys.modules)))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-c", probe]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    modules = json.loads(done.stdout.strip().splitlines()[-1])
    return {"all": set(modules), "ours": {m for m in modules if m.split(".")[0] == "lightning_mtl"}}


def _families() -> set[str]:
    return {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}


def test_import_lightning_mtl_loads_no_family_and_no_timm():
    loaded = _loaded_after("import lightning_mtl")
    assert loaded["ours"] == {"lightning_mtl"}
    assert "timm" not in loaded["all"] and "torchvision" not in loaded["all"]


def test_the_ema_teacher_import_loads_only_generic_callbacks_and_floor_0():
    loaded = _loaded_after("from lightning_mtl.callbacks import EMATeacher")
    assert "timm" not in loaded["all"]
    for family in ("continual", "ssl", "multitask"):
        assert f"lightning_mtl.{family}" not in loaded["all"], family
    for module in loaded["ours"] - {"lightning_mtl"}:
        top = module.split(".")[1]
        assert top == "callbacks" or top.startswith("_"), module


def test_lazy_names_resolve_to_their_owners_and_unknown_names_fail():
    import lightning_mtl
    import lightning_mtl.callbacks as callbacks
    from lightning_mtl.continual import AnytimeEvaluation
    from lightning_mtl.multitask import MultiTaskModule
    from lightning_mtl.ssl import KNNMonitor

    assert lightning_mtl.MultiTaskModule is MultiTaskModule
    assert callbacks.AnytimeEvaluation is AnytimeEvaluation and lightning_mtl.KNNMonitor is KNNMonitor
    assert lightning_mtl.multitask.MultiTaskModule is MultiTaskModule  # subpackages by attribute, as before
    assert {"MultiTaskModule", "multitask", "import_families"} <= set(dir(lightning_mtl))
    assert {"KNNMonitor", "EMATeacher"} <= set(dir(callbacks))
    lightning_mtl.import_families()
    for name in lightning_mtl.__all__:
        assert getattr(lightning_mtl, name) is not None, name
    for module in (lightning_mtl, callbacks):
        with pytest.raises(AttributeError, match="no attribute 'NoSuchThing'"):
            module.NoSuchThing  # noqa: B018


def test_old_import_paths_still_work():
    from lightning_mtl._distributed import gather_rows
    from lightning_mtl._features import batch_features
    from lightning_mtl.callbacks.anytime import AnytimeEvaluation
    from lightning_mtl.callbacks.knn import KNNMonitor
    from lightning_mtl.callbacks.linear_probe import OnlineLinearProbe
    from lightning_mtl.continual import AnytimeEvaluation as owned_anytime
    from lightning_mtl.multitask import MISSING_LABEL
    from lightning_mtl.ssl import KNNMonitor as owned_knn
    from lightning_mtl.ssl import OnlineLinearProbe as owned_probe
    from lightning_mtl.ssl._distributed import gather_rows as old_gather_rows
    from lightning_mtl.ssl._features import batch_features as old_batch_features

    assert AnytimeEvaluation is owned_anytime and KNNMonitor is owned_knn and OnlineLinearProbe is owned_probe
    assert old_gather_rows is gather_rows and old_batch_features is batch_features and MISSING_LABEL == -100


def _imports(path: Path) -> list[tuple[str, int]]:
    """``lightning_mtl`` modules a source file imports, with line numbers (relative imports resolved)."""
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    package = package.removesuffix(".__init__")
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            for alias in node.names:  # `from lightning_mtl import ssl` names a module: count that one
                named = f"{base}.{alias.name}"
                where = ROOT.joinpath(*named.split("."))
                found.append((named if where.is_dir() or where.with_suffix(".py").exists() else base, node.lineno))
    return [(name, line) for name, line in found if name.split(".")[0] == "lightning_mtl"]


def _node(module: str) -> str:
    """``multitask`` for ``lightning_mtl.multitask.x``; ``_modes`` / ``cli`` for top-level modules."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _graph() -> dict[str, dict[str, list[str]]]:
    edges: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        source = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        for name, line in _imports(path):
            target = _node(name)
            if target != source:
                edges[source][target].append(f"{path.relative_to(ROOT)}:{line}")
    return edges


def test_floor_0_imports_no_family_and_no_family_imports_an_entry_point():
    edges = _graph()
    families = _families()
    wrong = []
    for source, targets in edges.items():
        for target, where in targets.items():
            if source.startswith("_") and source not in ENTRY_POINTS and not target.startswith("_"):
                wrong.append(f"floor 0 {source} -> {target} at {where}")
            if source in families and target in ENTRY_POINTS:
                wrong.append(f"family {source} -> entry point {target} at {where}")
    assert not wrong, "\n".join(wrong)


def test_no_family_imports_another_familys_private_module():
    families = _families()
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        source = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        for name, line in _imports(path):
            parts = name.split(".")
            if len(parts) > 2 and parts[1] in families and parts[1] != source:
                if any(part.startswith("_") and part != "__init__" for part in parts[2:]):
                    wrong.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert not wrong, "\n".join(wrong)


def test_no_folder_level_import_loop():
    edges = _graph()
    families = _families()
    graph = {s: {t for t in targets if t in families} for s, targets in edges.items() if s in families}
    # strongly connected components (Tarjan): any component of two or more folders is a loop
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    loops: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                loops.append(sorted(component))

    for v in sorted(families):
        if v not in index:
            visit(v)
    described = [f"{a} -> {b}: {edges[a][b]}" for loop in loops for a in loop for b in loop if b in graph.get(a, ())]
    assert not loops, "folder-level import loops:\n" + "\n".join(described)


def _uses_torch_distributed(path: Path) -> list[int]:
    lines = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import) and any(a.name.startswith("torch.distributed") for a in node.names):
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch.distributed"):
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module == "torch":
            lines += [node.lineno for alias in node.names if alias.name == "distributed"]
        elif isinstance(node, ast.Attribute) and node.attr == "distributed":
            if isinstance(node.value, ast.Name) and node.value.id == "torch":
                lines.append(node.lineno)
    return lines


def test_every_collective_goes_through_the_distributed_module():
    users = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(ROOT).as_posix())
        if rel != "lightning_mtl/_distributed.py" and (lines := _uses_torch_distributed(path)):
            users[rel] = lines
    assert not users, f"torch.distributed outside lightning_mtl/_distributed.py: {users}"
