"""Every repository path that the README or a documentation page names exists, so a moved or renamed
file breaks CI instead of a reader's copy-paste.

A path with a placeholder (``<method>``, ``*``) or a brace list (``{a,b}``) is expanded and globbed; it
must match at least one file. Relative links and images of a page resolve from the page's folder.
"""

import itertools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]

# a path of the repository mentioned in prose, code or a command: a top-level folder, then path characters
_PATH = re.compile(r"(?<![\w/.-])((?:configs|docs|examples|benchmarks|lightning_mtl|tests)/[\w./{},<>*-]*[\w/}>*])")
# what a mention must look like to count as a file or folder of ours (not e.g. LibMTL's `examples/nyu`)
_KIND = {
    "configs": re.compile(r"(\.yaml|/)$"),
    "docs": re.compile(r"(\.\w+|/)$"),
    "examples": re.compile(r"\.(py|sh)$"),
    "benchmarks": re.compile(r"\.(py|sh)$"),
    "lightning_mtl": re.compile(r"(\.py|/)$"),
    "tests": re.compile(r"(\.py|/)$"),
}
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _expand_braces(text: str) -> list[str]:
    parts = re.split(r"(\{[^{}]*\})", text)
    choices = [p[1:-1].split(",") if p.startswith("{") else [p] for p in parts]
    return ["".join(c) for c in itertools.product(*choices)]


def _exists(base: Path, mention: str) -> bool:
    for candidate in _expand_braces(mention):
        pattern = re.sub(r"<[^<>]+>", "*", candidate)
        if any(ch in pattern for ch in "*?["):
            if not any(base.glob(pattern.rstrip("/"))):
                return False
        elif not (base / candidate).exists():
            return False
    return True


def _mentions(page: Path) -> list[str]:
    text = page.read_text(encoding="utf-8")
    found = []
    for match in _PATH.finditer(text):
        path = match.group(1).split("::")[0]
        if _KIND[path.split("/", 1)[0]].search(path):
            found.append(path)
    return found


def _links(page: Path) -> list[str]:
    links = []
    for target in _LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a web address or an anchor of the same page
        links.append(target.split("#", 1)[0])
    return links


def test_the_scan_sees_the_readme_paths():
    # a broken pattern would otherwise pass by checking nothing
    readme = _mentions(ROOT / "README.md")
    assert "configs/quickstart.yaml" in readme
    assert "docs/toy_trajectories.png" in readme
    assert "docs/api/aggregators.md" in _links(ROOT / "README.md")


def test_the_expansion_of_placeholders():
    assert _expand_braces("configs/{a,b}/x{,_y}.yaml") == [
        "configs/a/x.yaml",
        "configs/a/x_y.yaml",
        "configs/b/x.yaml",
        "configs/b/x_y.yaml",
    ]
    assert _exists(ROOT, "configs/methods/<method>.yaml")
    assert not _exists(ROOT, "configs/multidigits/no_such_method.yaml")
    assert not _exists(ROOT, "configs/no_such_folder/<method>.yaml")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_named_path_exists(page):
    missing = [m for m in _mentions(page) if not _exists(ROOT, m)]
    missing += [link for link in _links(page) if link and not _exists(page.parent, link)]
    assert not missing, f"{page.relative_to(ROOT)} names paths that do not exist: {sorted(set(missing))}"
