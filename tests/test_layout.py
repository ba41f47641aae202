"""The rooms of docs/architecture.rst hold: which module may import which, and no import cycle.

The rules are read from the table in ``docs/architecture.rst`` (one source: the page cannot go
stale without this test failing). Imports are read from the source (the AST), so imports inside
functions count too; imports under ``if TYPE_CHECKING:`` (annotations only) do not.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("orchester", "satellites", "serializers", "tracker", "topology_tests")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def imports_of(module: str) -> set[str]:
    """Every module ``module`` imports (ours resolved to the longest known name; others as written)."""
    path = MODULES[module]
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _type_checking(node):
            return
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            submodules = {f"{target}.{a.name}" for a in node.names} & MODULES.keys()
            names.update(submodules)
            if len(submodules) < len(node.names):  # (``from . import module`` is no import of the package)
                names.add(target)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    resolved = set()
    for name in names:
        parts = name.split(".")
        while len(parts) > 1 and ".".join(parts) not in MODULES:
            parts.pop()
        resolved.add(".".join(parts))
    return resolved - {module}


GRAPH = {m: imports_of(m) for m in MODULES}


def _rows() -> list[tuple[list[str], list[str]]]:
    """(modules a row names, what they must not import) from the rooms table of the architecture page."""
    text = (ROOT / "docs" / "architecture.rst").read_text()
    table = text.split("Rooms\n=====", 1)[1].split("\n\n.. list-table::", 1)[1]
    table = re.split(r"\n(?=\S)", table, maxsplit=1)[0]  # up to the next unindented line
    rows = []
    for row in table.split("\n   * - ")[1:]:
        cells = [c.strip() for c in row.split("\n     - ")]
        assert len(cells) == 3, f"a row of the rooms table needs 3 cells: {cells[0][:60]}"
        names = re.findall(r"``([\w.]+)``", cells[0])
        forbidden = re.findall(r"``([\w.]+)``", cells[2])
        rows.append((names, forbidden))
    return rows


ROWS = _rows()


def _rule(module: str) -> tuple[str, list[str]] | None:
    """The most specific row that covers ``module``: its name and what it forbids."""
    best: tuple[str, list[str]] | None = None
    for names, forbidden in ROWS:
        for name in names:
            if (module == name or module.startswith(name + ".")) and (best is None or len(name) > len(best[0])):
                best = (name, forbidden)
    return best


def test_the_rooms_table_names_every_room() -> None:
    rooms = {".".join(m.split(".")[:2]) if m.startswith("orchester.") else m.split(".")[0] for m in MODULES}
    uncovered = sorted(r for r in rooms if r != "orchester" and not r.endswith("__main__") and _rule(r) is None)
    assert not uncovered, f"docs/architecture.rst has no row for {uncovered}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_a_module_imports_nothing_its_room_forbids(module: str) -> None:
    rule = _rule(module)
    if rule is None:
        return  # the package's own __init__ (the public API) and __main__
    room, forbidden = rule
    bad = sorted(i for i in GRAPH[module] for f in forbidden if i == f or i.startswith(f + "."))
    assert not bad, f"{module} (room {room}) imports {bad}, which docs/architecture.rst forbids"


def test_no_import_cycle() -> None:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan's strongly connected components (the graph is small)
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in MODULES:
                continue
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            # a package importing its own modules (its __init__) is no cycle of substance
            if len(component) > 1 and not all(m == component[0] or m.startswith(component[0] + ".")
                                                for m in component):
                cycles.append(sorted(component))

    for v in sorted(MODULES):
        if v not in index:
            connect(v)
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize(("module", "forbidden"), [
    ("satellites.cli", ("orchester.cli.main", "orchester.server.broker", "orchester.server.core")),
    ("satellites.satellite", ("orchester.cli.main", "orchester.server.broker", "orchester.server.core")),
    ("serializers", ("orchester", "satellites", "tracker")),
    ("tracker", ("orchester", "satellites", "zmq")),
])
def test_a_package_does_not_load_what_it_must_not(module: str, forbidden: tuple[str, ...]) -> None:
    """What a fresh interpreter actually loads (packages' ``__init__`` files included)."""
    code = (f"import sys, {module}\n"
            "print(' '.join(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    leaked = [m for m in out.stdout.split() if any(m == f or m.startswith(f + ".") for f in forbidden)]
    assert not leaked, f"{module} loads {leaked}"


def test_no_test_imports_the_tests_directory_as_a_package() -> None:
    """``tests`` is no package: pytest puts each test's directory on the path, so a test imports a
    sibling as ``conftest`` or ``test_core``. ``from tests.conftest import …`` works only when the
    checkout is itself on ``PYTHONPATH`` — and fails the README's plain ``pytest`` on a fresh clone."""
    offenders = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno}" for n in names
                          if n == "tests" or n.startswith("tests.")]
    assert not offenders, f"imports of the tests directory as a package: {offenders}"
