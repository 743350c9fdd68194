"""The README's quickstart is what CI runs and what the configs hold."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _quickstart_commands():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quickstart", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_quickstart_has_exactly_two_commands():
    commands = _quickstart_commands()
    assert len(commands) == 2
    assert "python -m lightning_mtl fit --config configs/quickstart.yaml" in commands[0]
    assert (ROOT / "configs/quickstart.yaml").is_file()


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci/run").read_text()
    assert _quickstart_commands()[1] in ci


def test_readme_stays_a_front_page():
    # the manual lives in docs/ (mkdocs.yml); the README keeps what it is, a picture, the commands, the methods
    assert len((ROOT / "README.md").read_text()) <= 8000
