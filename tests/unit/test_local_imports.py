"""The local tooling's modules import one another without a cycle, lazy (in-function) imports included.

A cycle (``billing_local.cli`` importing ``cli_invoke`` which imported ``cli`` back for its seeding
helpers) works only as long as every such import stays inside a function; the run itself lives in
``billing_local.local_run``, which the CLI modules, the tests and the benchmarks import.
"""

from __future__ import annotations

import ast
import functools
import graphlib
from pathlib import Path

import billing_local

PACKAGE = Path(billing_local.__file__).parent


def _imports(path: Path, module: str) -> set[str]:
    """Every billing_local module ``path`` imports, at any depth of its code."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing module's package
                base = module.rsplit(".", node.level)[0]
                names = [f"{base}.{node.module}" if node.module else base]
            else:
                names = [node.module or ""]
            # `from billing_local import cli` names a module too
            names += [f"{names[0]}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {n for n in names if n.startswith("billing_local.")}
    return found


@functools.cache  # parsed once for both tests
def _graph() -> dict[str, set[str]]:
    modules = {
        "billing_local." + ".".join(p.relative_to(PACKAGE).with_suffix("").parts): p
        for p in PACKAGE.rglob("*.py")
        if p.name != "__init__.py"
    }
    return {name: _imports(path, name) & set(modules) - {name} for name, path in modules.items()}


def test_the_local_modules_have_no_import_cycle() -> None:
    graph = _graph()
    assert "billing_local.local_run" in graph["billing_local.cli"]  # the graph sees what it should
    graphlib.TopologicalSorter(graph).prepare()  # raises CycleError naming the cycle


def test_the_run_module_imports_no_command_line_module() -> None:
    commands = {"billing_local.cli", "billing_local.cli_ops", "billing_local.cli_invoke"}
    assert not _graph()["billing_local.local_run"] & commands
