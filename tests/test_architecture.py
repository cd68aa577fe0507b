"""The package's layers (ARCHITECTURE.md): imports go only toward lower layers, and there is no cycle.

Every module of ``localvol_fast`` is read with ``ast`` (nothing is imported), every import of a package
module is resolved, and:
- a module imports only from its own layer or lower ones;
- the graph of module imports has no cycle (one layer's modules included);
- an import inside a function is allowed only of a module that wraps an optional dependency (the
  compiled extension, triton, matplotlib, ...): never to break a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "localvol_fast"
# ``integrations`` (training-loop hooks, an optional third-party base class) sits above the library and
# below the programs: the package root never imports it, and ``apps`` may.
LAYERS = ("core", "ops", "engine", "nn", "compat", "integrations", "apps")
# The package root (the public names) sits above the library layers and below the programs; its
# ``__main__`` runs the command line.
ROOT_RANK, MAIN_RANK = LAYERS.index("compat") + 0.5, len(LAYERS)
# Modules that import an optional dependency when they load: callers may import them lazily.
OPTIONAL_DEPENDENCY_MODULES = ("localvol_fast._C", "localvol_fast.ops.compiled", "localvol_fast.ops.triton")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def rank(module: str) -> float:
    parts = module.split(".")
    if len(parts) == 1:
        return ROOT_RANK
    if parts[1] == "__main__":
        return MAIN_RANK
    if parts[1] == "_C":
        return LAYERS.index("ops")
    return LAYERS.index(parts[1])


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, modules: dict[str, Path], source: str | None = None) -> list[tuple[str, int, bool]]:
    """(imported package module, line, inside a function) for every import of ``path`` (or of ``source``
    read as that module)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text() if source is None else source, filename=str(path))
    in_function = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function.update(id(child) for child in ast.walk(node) if child is not node)
    found = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # "from pkg import name": name may be a submodule (or the compiled extension)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules or a.name == "_C" else base for a in node.names]
        for target in targets:
            if target == "localvol_fast" or target.startswith("localvol_fast."):
                while target not in modules and "." in target and target != "localvol_fast._C":
                    target = target.rpartition(".")[0]
                found.append((target, node.lineno, id(node) in in_function))
    return found


def graph() -> dict[str, list[tuple[str, int, bool]]]:
    modules = all_modules()
    return {name: imports_of(path, modules) for name, path in modules.items()}


def test_every_module_is_in_a_layer():
    stray = [m for m in all_modules() if m.count(".") >= 1 and m.split(".")[1] not in (*LAYERS, "__main__", "_C")]
    assert not stray, f"modules outside the layers {LAYERS}: {stray}"


def test_imports_only_go_down():
    wrong = []
    for module, imports in graph().items():
        for target, line, _ in imports:
            if rank(target) > rank(module):
                wrong.append(f"{module}:{line} imports {target} (a higher layer)")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
    edges = {m: sorted({t for t, _, _ in imports if t != m}) for m, imports in graph().items()}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for t in edges.get(m, []):
            if state.get(t) == 1:
                return path[path.index(t) :] + [t]
            if t not in state:
                cycle = visit(t)
                if cycle:
                    return cycle
        path.pop()
        state[m] = 2
        return None

    for m in edges:
        if m not in state:
            cycle = visit(m)
            assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_lazy_imports_only_for_optional_dependencies():
    wrong = []
    for module, imports in graph().items():
        for target, line, lazy in imports:
            if lazy and not target.startswith(OPTIONAL_DEPENDENCY_MODULES):
                wrong.append(f"{module}:{line} imports {target} inside a function")
    assert not wrong, "\n".join(wrong)


def test_the_checks_can_fail():
    """Modules written against the rules are caught, so the checks above are not vacuous."""
    probe = PACKAGE / "core" / "probe.py"
    modules = {**all_modules(), "localvol_fast.core.probe": probe}
    upward = imports_of(probe, modules, "from localvol_fast.nn.estimator import estimate\n")
    assert [rank(t) > rank("localvol_fast.core.probe") for t, _, _ in upward] == [True]
    lazy = imports_of(probe, modules, "def f():\n    from localvol_fast.core.search import search_radii\n")
    assert [(t, inside) for t, _, inside in lazy] == [("localvol_fast.core.search", True)]
