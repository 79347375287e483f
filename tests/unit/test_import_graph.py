"""The package's import graph has no cycles, its layers import only downward, and a
function-local import of an rsq module defers something heavy.

The graph is read from the source (ast), with every import of an rsq module counted, whether at
module level or inside a function (a function-local import is a dependency all the same); imports
under ``if TYPE_CHECKING:`` are annotations only and are left out. A module importing
``rsq.a.b`` depends on ``rsq.a.b`` (the implicit import of the parent packages is not counted).

Run as a script (``python3 tests/unit/test_import_graph.py``) it lists the function-local imports
of rsq modules and counts them.
"""

from __future__ import annotations

import ast
import functools
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


# ----------------------------------------------------------------------------- function-local imports

# What a function-local import may defer: optional packages that cost seconds to import or may be
# missing, and rsq.kernels, whose custom ops (rsq/kernels/ops.py) load torch's compiler stack
# (torch._dynamo: 1.8 s of a 3.3 s `rsq --help` on the 2-core CPU, python -X importtime). torch
# itself is no reason: `import rsq` loads it (rsq.config).
HEAVY = {
    "transformers",
    "triton",
    "compressed_tensors",
    "datasets",
    "lm_eval",
    "matplotlib",
    "gguf",
    "huggingface_hub",
    "accelerate",
    "tokenizers",
    "humming",
    "vllm",
    "rsq.kernels",
}

# Function-local imports kept for another reason than HEAVY or a cycle at load, each with it
# ("module": {imported}). Upward imports of the number-format registry (ALLOWED_UPWARD) stay lazy so
# that the config loads without the formats; the rest are in the kernels, the quantized modules and
# the formats (issue 29's files, reworked there): listed so that any new one fails.
LOCAL_KEPT = {
    "rsq.config": {"rsq.formats"},
    "rsq.kernels.humming_backend": {"rsq.quant.pack", "rsq.kernels.reference"},
    "rsq.kernels.triton_e8p": {"rsq.quant.e8p"},
    "rsq.kernels.triton_hadamard": {"rsq.errors", "rsq.rotation.hadamard"},
}


def _top_level_imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """What importing ``name`` imports: its module-level imports (not in functions, classes or
    TYPE_CHECKING blocks; try/if bodies count), rsq modules by name, others by top-level package."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(body) -> None:
        for node in body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found.update(_targets(node, package, modules))
            elif isinstance(node, ast.If) and not _is_type_checking(node):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                    visit(block)

    visit(tree.body)
    return found


def _targets(node, package: str, modules: dict[str, Path]) -> set[str]:
    """The modules an import statement names: rsq modules (the longest existing prefix), else the
    top-level package of a third-party one."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            parts = package.split(".")
            base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
        names = [f"{base}.{a.name}" for a in node.names]
    out = set()
    for full in names:
        if full.split(".")[0] != "rsq":
            out.add(full.split(".")[0])
            continue
        while full and full not in modules:
            full = full.rpartition(".")[0]
        if full:
            out.add(full)
    return out


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


@functools.cache
def _direct_loads() -> dict[str, set[str]]:
    """Module -> what its module-level imports load directly (rsq modules with their parents)."""
    modules = _modules()
    direct = {}
    for name, path in modules.items():
        deps = _top_level_imports(path, name, modules)
        deps |= {p for d in set(deps) if d in modules for p in _parents(d)} | set(_parents(name))
        direct[name] = deps - {name}
    return direct


def _reach(start: str, direct: dict[str, set[str]], done: frozenset = frozenset()) -> set[str]:
    """Everything importing ``start`` loads, not expanding modules in ``done`` (already imported)."""
    seen, todo = {start}, [start]
    while todo:
        for dep in direct.get(todo.pop(), ()):
            if dep not in seen:
                seen.add(dep)
                if dep in direct and dep not in done:
                    todo.append(dep)
    return seen


def loads_at_import() -> dict[str, set[str]]:
    """Module -> every module and third-party package that importing it loads (parents too)."""
    direct = _direct_loads()
    return {name: _reach(name, direct) for name in direct}


def _cycle_at_load(importer: str, imported: str, direct: dict[str, set[str]]) -> bool:
    """Whether importing ``imported`` at ``importer``'s top would come back to ``importer`` while it
    is half-initialised (its parent packages are already imported then, so they are not expanded)."""
    return importer in _reach(imported, direct, frozenset(_parents(importer)))


def function_local_imports() -> list[tuple[str, int, str, set[str]]]:
    """(module, line, function, imported rsq modules) of every import of an rsq module in a function."""
    modules = _modules()
    rows = []
    for name, path in sorted(modules.items()):
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(), str(path))
        seen = set()
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in seen:
                    seen.add(id(node))
                    rsq_mods = {t for t in _targets(node, package, modules) if t in modules}
                    if rsq_mods:
                        rows.append((name, node.lineno, fn.name, rsq_mods))
    return rows


def _deferred(importer: str, imported: set[str], loads: dict[str, set[str]]) -> set[str]:
    """Why ``importer`` imports ``imported`` in a function: the heavy things that loads and
    importing ``importer`` (and rsq) does not, "a cycle at load" where ``imported`` loads
    ``importer`` (at module level it would find it half-initialised), "listed" (LOCAL_KEPT)."""
    before = loads[importer] | loads["rsq"]
    why = {h for m in imported for h in (loads[m] & HEAVY)} - before
    direct = _direct_loads()
    if any(_cycle_at_load(importer, m, direct) for m in imported):
        why.add("a cycle at load")
    if imported <= LOCAL_KEPT.get(importer, set()):
        why.add("listed")
    return why


def test_heavy_deferral_is_detected():
    loads = loads_at_import()
    assert "rsq.kernels" in loads["rsq.nn.linear"] and "torch" in loads["rsq"]
    assert _deferred("rsq.cli.cmd_quantize", {"rsq.job.run"}, loads) == {"rsq.kernels"}
    assert _deferred("rsq.job.run", {"rsq.errors"}, loads) == set()


def test_function_local_imports_defer_something_heavy():
    """A function-local import of an rsq module hides the import graph; it is kept only where it
    defers a HEAVY import (or breaks a listed cycle): move any other to the module's top."""
    loads = loads_at_import()
    needless = [
        f"{name}:{line} ({fn}) imports {', '.join(sorted(imported))}"
        for name, line, fn, imported in function_local_imports()
        if not _deferred(name, imported, loads)
    ]
    assert needless == [], "function-local imports that defer nothing heavy:\n" + "\n".join(needless)


if __name__ == "__main__":
    loads = loads_at_import()
    rows = function_local_imports()
    for name, line, fn, imported in rows:
        why = ", ".join(sorted(_deferred(name, imported, loads))) or "NOTHING"
        print(f"{name}:{line}\t{fn}\t{', '.join(sorted(imported))}\tkept for: {why}")
    print(
        f"{len(rows)} function-local imports of rsq modules, "
        f"{sum(1 for n, _, _, i in rows if not _deferred(n, i, loads))} deferring nothing heavy"
    )


def test_cli_start_up_leaves_the_heavy_packages_for_the_commands_that_use_them():
    """`rsq --help` (the CLI's start-up and parsing): torch is needed, but
    torch._dynamo (1-3 s: once pulled in by a decorator in rsq.kernels.backends), transformers,
    accelerate, datasets, lm-eval, matplotlib, compressed-tensors and Triton are imported by the
    commands that use them. A fresh interpreter, so earlier tests' imports do not count."""
    import subprocess
    import sys

    heavy = [
        "torch._dynamo", "transformers", "accelerate", "datasets", "lm_eval", "matplotlib",
        "compressed_tensors", "triton",
    ]  # fmt: skip
    code = (
        "import io, contextlib, runpy, sys\n"
        "sys.argv = ['rsq', '--help']\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    runpy.run_module('rsq', run_name='__main__')\n"
        f"print([m for m in {heavy!r} if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"imported by `rsq --help`: {out.stdout.strip()}"
