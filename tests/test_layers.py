"""The import layering of driver/, plugin/ and ops/, read from the source
(issue 12): no import circle, also none through an import inside a function;
the flag defaults' module at the bottom; nothing imports the command line;
the packages in one order, plugin/ over ops/ over driver/."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("driver", "plugin", "ops")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the modules of ours it imports anywhere in its text."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                # `from pkg import sub` imports the submodule, not only the package.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_checker_sees_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_among_driver_plugin_and_ops():
    assert circles(import_graph()) == []


def test_settings_are_at_the_bottom_and_nothing_imports_the_command_line():
    graph = import_graph()
    assert not {d for d in graph["driver.settings"] if d.startswith(("plugin", "ops"))}
    assert [m for m, deps in graph.items() if "plugin.cli" in deps] == []


def test_the_packages_import_downwards_only():
    """plugin/ (the HTTP face and the `pyoverlay` command line) may use ops/
    (the operator commands) and driver/; ops/ uses driver/ only; driver/
    neither: no import runs back up, even between packages."""
    graph = import_graph()
    up = {"driver": ("plugin", "ops"), "ops": ("plugin",), "plugin": ()}
    back = sorted((m, d) for m, deps in graph.items() for d in deps
                  if d.split(".")[0] in up[m.split(".")[0]])
    assert back == []
