"""The README and docs/ point at things that exist: links, files, settings, the test command."""

import ast
import inspect
import re
from pathlib import Path

import pytest

from smai_plugin import Smai

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FILES_NAMED = re.compile(r"(?<![\w/.])((?:configs|scripts|benchmarks|tests|src|docs|sample_data)/[\w./-]*\w)")


def test_the_readme_is_a_front_door_not_a_notebook() -> None:
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines: move depth into docs/"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_links_and_named_files_exist(page: Path) -> None:
    text = page.read_text()
    links = [target.split("#")[0] for target in re.findall(r"\]\(([^)\s]+)\)", text) if "://" not in target]
    missing = [link for link in links if link and not (page.parent / link).exists()]
    named = [path.rstrip(".") for path in FILES_NAMED.findall(text) if "<" not in path and "*" not in path]
    missing += [path for path in named if not (REPO / path).exists()]
    assert not missing, f"{page.name} points at what does not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_no_placeholder_is_left(page: Path) -> None:
    assert not re.findall(r"\b[A-Z]+_TABLE\b", page.read_text())


def test_the_readme_test_command_is_what_ci_runs() -> None:
    assert "bash scripts/test.sh" in (REPO / "README.md").read_text()
    assert "bash scripts/test.sh" in (REPO / ".ci" / "run").read_text()


def test_python_examples_parse_and_pass_only_real_settings() -> None:
    parameters = set(inspect.signature(Smai).parameters)
    for page in PAGES:
        for block in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.DOTALL):
            tree = ast.parse(block)
            for call in (node for node in ast.walk(tree) if isinstance(node, ast.Call)):
                if isinstance(call.func, ast.Name) and call.func.id == "Smai":
                    unknown = {keyword.arg for keyword in call.keywords} - parameters
                    assert not unknown, f"{page.name}: Smai has no {unknown}"
