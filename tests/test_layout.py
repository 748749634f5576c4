"""The package's layout follows the data: rooms in flow order, imports pointing down only.

Read from the source with ``ast`` (nothing is imported), so every import counts: module-level,
inside functions, under ``TYPE_CHECKING``. The rooms and their order are those of
``docs/architecture.md``; a module imports from its own room or rooms above it, never below, and the
graph of the package's own modules has no cycle. Outside ``cli/`` (which imports its commands lazily so
that ``ppn --help`` starts without torch), a module imports the package's own modules at its top,
where a reader sees its dependencies.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ppn_bayes"

#: The rooms in flow order. Ground-floor modules are top-level files; the last room holds the
#: facade (``run.py``), the comparison, the main job and the CLI, which may import everything.
ROOMS = ["ground", "hub", "data", "backbone", "baselines", "bayes", "training", "analysis", "export",
         "evaluation", "top"]
GROUND = {"errors", "files", "device", "schema", "shipped", "config", "version"}
TOP_FILES = {"run", "compare", "demo", "__init__", "__main__"}
MAX_LINES = 500
#: Own modules that may be imported inside a function: each imports a heavy or optional third-party
#: library at its top, which a module-level import would force on everyone.
LAZY_OK = {"ppn_bayes.baselines.prunepath_triton": "imports triton, the optional [triton] extra"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def room(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:  # ppn_bayes/__init__.py, the public API table
        return "top"
    first = parts[1]
    if len(parts) == 2 and (PACKAGE / f"{first}.py").is_file():
        if first in GROUND:
            return "ground"
        if first in TOP_FILES:
            return "top"
        raise AssertionError(f"top-level module ppn_bayes/{first}.py is in no room: put it in a subpackage "
                             "or add it to GROUND/TOP_FILES (and docs/architecture.md)")
    if first in ("cli", "compare"):
        return "top"
    if first not in ROOMS:
        raise AssertionError(f"subpackage ppn_bayes/{first}/ is in no room: add it to ROOMS and docs/architecture.md")
    return first


def _resolve(module: str, node: ast.ImportFrom | ast.Import, is_package: bool) -> list[str]:
    """The package's own modules that one import statement reads."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        names = [f"{source}.{a.name}" if f"{source}.{a.name}" in MODULES else source for a in node.names]
    out = []
    for name in names:
        if not name.startswith("ppn_bayes"):
            continue
        while name not in MODULES and "." in name:
            name = name.rsplit(".", 1)[0]
        if name != module:
            out.append(name)
    return out


def imports(module: str, source: str | None = None) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for every import of the package's own modules."""
    path = MODULES.get(module, PACKAGE / "x.py")
    tree = ast.parse(path.read_text() if source is None else source, str(path))
    in_function: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function.update(id(sub) for sub in ast.walk(node) if sub is not node)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for target in _resolve(module, node, path.name == "__init__.py"):
                out.append((target, node.lineno, id(node) in in_function))
    return out


GRAPH = {m: imports(m) for m in MODULES}


def test_every_module_has_a_room():
    for module in MODULES:
        assert room(module) in ROOMS


def test_imports_point_down_the_flow():
    wrong = []
    for module, edges in GRAPH.items():
        for target, line, _ in edges:
            if ROOMS.index(room(target)) > ROOMS.index(room(module)):
                wrong.append(f"{MODULES[module].relative_to(PACKAGE.parent)}:{line} ({room(module)}) imports "
                             f"{target} ({room(target)})")
    assert not wrong, "imports pointing up the flow:\n" + "\n".join(wrong)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles():
    graph = {m: {t for t, _, _ in edges} for m, edges in GRAPH.items()}
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_own_imports_at_module_top_outside_the_cli():
    lazy = [f"{MODULES[m].relative_to(PACKAGE.parent)}:{line} imports {t} inside a function"
            for m, edges in GRAPH.items() if not m.startswith("ppn_bayes.cli")
            for t, line, inside in edges if inside and t not in LAZY_OK]
    assert not lazy, "\n".join(lazy)


def test_modules_are_small():
    big = {str(p.relative_to(PACKAGE.parent)): n for p in MODULES.values()
           if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines (probably two ideas each): {big}"


def test_the_checks_can_fail():
    """Power: each rule above rejects a graph that breaks it."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert ROOMS.index(room("ppn_bayes.training.loop")) > ROOMS.index(room("ppn_bayes.bayes.prior"))
    assert room("ppn_bayes.errors") == "ground" and room("ppn_bayes.cli.fit_cmd") == "top"
    found = imports("ppn_bayes.bayes.prior", "from ppn_bayes.errors import PPNError\n"
                    "if TYPE_CHECKING:\n    from ppn_bayes.training.session import Session\n"
                    "def f():\n    from ppn_bayes import run\n    import ppn_bayes.analysis.plots\n")
    assert found == [("ppn_bayes.errors", 1, False), ("ppn_bayes.training.session", 3, False),
                     ("ppn_bayes.run", 5, True), ("ppn_bayes.analysis.plots", 6, True)]
    with pytest.raises(AssertionError, match="in no room"):
        room("ppn_bayes.nowhere.module")
