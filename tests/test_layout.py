"""The house: no import cycle between the package's modules (issue 18: core <-> io, evaluation.cli <-> sweep).

Every import statement counts, the ones inside functions too (a lazy import hides a cycle, it does not remove
it); ``TYPE_CHECKING`` blocks do not. ``import hf_embcomp`` then ``hf_embcomp.NAME`` counts as an import of the
module that defines NAME (``hf_embcomp._EXPORTS``). Sub-commands registered by name through
``importlib.import_module`` (``hf_embcomp.cli._COMMAND_MODULES``) are plug-ins and are not edges.
"""

from __future__ import annotations

import ast
from pathlib import Path

import hf_embcomp

PACKAGE = Path(hf_embcomp.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    out = {}
    for p in PACKAGE.rglob("*.py"):
        parts = p.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (see the module docstring)."""
    mods = _modules()
    exports = hf_embcomp._EXPORTS
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        typing_only = {id(x) for n in ast.walk(tree) if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)
                       for b in n.body for x in ast.walk(b)}
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name != "hf_embcomp"]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                for a in node.names:
                    if f"{base}.{a.name}" in mods:
                        targets.append(f"{base}.{a.name}")
                    elif base == "hf_embcomp" and a.name in exports:
                        targets.append("hf_embcomp" + exports[a.name])
                    else:
                        targets.append(base)
            elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "hf_embcomp"
                  and node.attr in exports):
                targets = ["hf_embcomp" + exports[node.attr]]
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != name:
                    graph[name].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

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
            comp = []
            while not comp or comp[-1] != v:
                comp.append(stack.pop())
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_checker_sees_lazy_imports_and_cycles():
    graph = import_graph()
    assert "hf_embcomp.auto" in graph["hf_embcomp.core"]  # a function-level import
    assert "hf_embcomp.core" in graph["hf_embcomp.evaluation.sweep"]  # `import hf_embcomp` + hf_embcomp.compress
    assert "hf_embcomp.evaluation.results" in graph["hf_embcomp.evaluation.sweep"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    found = cycles(import_graph())
    assert found == [], "import cycles: " + "; ".join(" <-> ".join(c) for c in found)
