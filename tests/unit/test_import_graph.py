"""The package's import graph has no cycles, and its layers import only downward.

The graph is read from the source (ast), with every import of an rsq module counted, whether at
module level or inside a function (a function-local import is a dependency all the same); imports
under ``if TYPE_CHECKING:`` are annotations only and are left out. A module importing
``rsq.a.b`` depends on ``rsq.a.b`` (the implicit import of the parent packages is not counted).
"""

from __future__ import annotations

import ast
from pathlib import Path

import rsq

ROOT = Path(rsq.__file__).parent

# Upward imports that remain, each with its reason; any other fails. GridConfig.format looks its
# format up by name in the registry (lazily); the GPTQ solver takes a format's scalar operations.
# Both belong to the number-format seam (issues 28/29 own rsq/formats/).
ALLOWED_UPWARD = {("rsq.config", "rsq.formats"), ("rsq.solver.gptq", "rsq.formats")}

# Layers, lowest first: a module may import its own layer or lower ones, never a higher one.
LAYERS = [
    {"rsq.errors", "rsq.jsonsafe", "rsq.version", "rsq.log", "rsq.loss_outliers"},
    {"rsq.config", "rsq.quant", "rsq.models", "rsq.distributed", "rsq.recipe"},
    {"rsq.solver", "rsq.rotation", "rsq.kernels", "rsq.nn", "rsq.importance", "rsq.calib", "rsq.generation"},
    {"rsq.formats"},  # a number format is one unit: its grid, its solver, its module, its kernel backends
    {"rsq.checkpoint", "rsq.io"},
    {"rsq.eval", "rsq.plan", "rsq.report"},
    {"rsq.job"},
    {"rsq.api", "rsq"},
    {"rsq.cli", "rsq.__main__"},
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    skip = {
        id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node) for n in ast.walk(node)
    }
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else base)
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, name, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _layer(module: str) -> int:
    for depth, layer in enumerate(LAYERS):
        if module in layer or any(module.startswith(p + ".") for p in layer if p != "rsq"):
            return depth
    raise AssertionError(f"{module} is in no layer of LAYERS: add it where it belongs")


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_function_local_imports():
    graph = import_graph()
    assert "rsq.job.run" in graph["rsq.cli.cmd_quantize"]  # imported inside a function only


def test_no_import_cycles():
    found = cycles(import_graph())
    assert found == [], f"import cycles: {found}"


def test_layers_import_only_downward():
    upward = [
        f"{a} -> {b}"
        for a, deps in import_graph().items()
        for b in deps
        if _layer(b) > _layer(a) and (a, b) not in ALLOWED_UPWARD
    ]
    assert upward == [], "imports that point up a layer:\n" + "\n".join(sorted(upward))


def test_evaluation_does_not_import_the_quantization_job():
    graph = import_graph()
    for name, deps in graph.items():
        if name.startswith("rsq.eval"):
            assert not {d for d in deps if d.startswith(("rsq.job", "rsq.solver"))}, name
