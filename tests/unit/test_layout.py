"""The layout shows the design: no import cycle among syncd's modules, and no daemon imports the
lab (test tooling)."""

from __future__ import annotations

import ast
import pathlib

import syncd

ROOT = pathlib.Path(syncd.__file__).parent


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(path: pathlib.Path, modules: set[str]) -> set[str]:
    """Every syncd module ``path`` imports at run time (top level or inside functions; imports
    under ``if TYPE_CHECKING:`` are for the type checker only)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for a in node.names:
                out.add(a.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            for a in node.names:  # "from . import proto" names a module
                out.add(f"{mod}.{a.name}")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    found = set()
    for mod in out:
        while mod and mod not in modules:
            mod = mod.rpartition(".")[0]
        if mod and mod != name and mod != "syncd":
            found.add(mod)
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    modules = set(files)
    graph = {}
    for name, path in files.items():
        # A package's __init__ is loaded before any of its modules: count it as a dependency.
        deps = _imports(path, modules)
        graph[name] = {d for d in deps if not name.startswith(d + ".")}
    return graph


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def walk(n: str, stack: list[str]) -> None:
        state[n] = 1
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d] if d in stack else [n, d])
            elif d not in state:
                walk(d, stack + [d])
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            walk(n, [n])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_daemon_imports_the_lab():
    graph = _graph()
    tooling = ("syncd.lab", "syncd.cli", "syncd.__main__")
    bad = {n: sorted(d for d in deps if d == "syncd.lab" or d.startswith("syncd.lab."))
           for n, deps in graph.items() if not n.startswith(tooling)}
    assert not {n: d for n, d in bad.items() if d}, bad


def test_only_the_group_shell_writes_the_role_fields():
    """A group's persisted role, epoch, started, failsafe and witness_behind are assigned in one
    place (Group.command, copying the role machine's state); nothing else assigns them."""
    fields = {"role", "epoch", "started", "failsafe", "witness_behind", "peer_has_all", "peer_newer"}
    writers = []
    for path in ROOT.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                targets = node.targets if isinstance(node, ast.Assign) else \
                    [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
                for t in targets:
                    if (isinstance(t, ast.Attribute) and t.attr in fields and isinstance(t.value, ast.Attribute)
                            and t.value.attr == "st"):
                        writers.append(f"{_module_name(path)}.{fn.name}:{node.lineno}")
    assert writers and all(w.startswith("syncd.node.group.command:") for w in writers), writers
