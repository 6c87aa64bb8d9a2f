"""The shape of the code base: the linter passes, the import graph has no cycles, no module shadows a PyPI
package, and files and functions stay small enough to read (the limits of issue 9; exceptions named here)."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOP_LEVEL = {"admin", "config", "coordinator", "launch", "make_cert", "model", "monitor", "simulate", "text_monitor",
             "utils", "worker"}  # the programs and the three shared modules; the rest is in fedrest/
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60
LONGER_FUNCTIONS: dict[str, str] = {}  # "path:function" -> why it may be longer


def product_files() -> list[Path]:
    return sorted(ROOT.glob("*.py")) + sorted((ROOT / "fedrest").rglob("*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The project modules ``path`` imports (at any depth of the file), resolved to known module names."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name in known:
                found.add(name)
    return found


def test_the_linter_passes():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff, "ruff is not installed: make dev installs requirements-dev.txt"
    result = subprocess.run([ruff, "check", str(ROOT)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_only_the_programs_and_three_shared_modules_sit_at_the_top():
    assert {p.stem for p in ROOT.glob("*.py")} == TOP_LEVEL


@pytest.mark.parametrize("name", ["datasets", "client", "metrics", "aggregation", "federation", "store"])
def test_no_top_level_module_takes_a_package_name_that_moved(name):
    assert not (ROOT / f"{name}.py").exists()


def test_the_import_graph_has_no_cycles():
    modules = {module_name(p): p for p in product_files()}
    graph = {name: imports_of(path, set(modules)) - {name} for name, path in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, path + [dep])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


@pytest.mark.parametrize("path", product_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_files_and_functions_stay_small(path):
    source = path.read_text(encoding="utf-8")
    assert source.count("\n") <= MAX_FILE_LINES, f"{path.name}: {source.count(chr(10))} lines"
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            key = f"{path.relative_to(ROOT)}:{node.name}"
            assert length <= MAX_FUNCTION_LINES or key in LONGER_FUNCTIONS, f"{key}: {length} lines"


def test_the_worker_side_loads_no_coordinator_code():
    """A worker host needs the client, config, data, model and utilities: not Flask, not fedrest.server (nor do
    the monitors, which run anywhere; admin.py runs beside the coordinator and reads its TEMP_DIR)."""
    code = ("import sys, worker, monitor, text_monitor; "
            "print(sorted(m for m in sys.modules if m.startswith(('fedrest.server', 'flask', 'werkzeug', 'cheroot'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
