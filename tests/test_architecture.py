"""Layering rules that keep core/ testable and reusable from the CLI and worker processes."""

from __future__ import annotations

import ast
import subprocess
import sys

from tests.conftest import REPO

CORE = REPO / "core"


def _imported_modules(path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_no_core_module_imports_streamlit_or_pages() -> None:
    offenders = {
        path.name: sorted(_imported_modules(path) & {"streamlit", "pages"}) for path in sorted(CORE.glob("*.py"))
    }
    assert {name: mods for name, mods in offenders.items() if mods} == {}


def test_importing_the_cli_does_not_load_streamlit() -> None:
    code = "import sys, core.cli; print('streamlit' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
