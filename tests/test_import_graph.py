"""The training package's import graph has no cycle.

Every ``import`` / ``from ... import`` statement of every module under ``training/`` counts,
including the ones inside functions: a lazy import only postpones a circle to the first call,
where it can still fail half-initialised, and it hides the layering (dataset -> sampler -> model
-> recipe -> engine -> commands) from the reader.  Importing ``a.b.c`` runs ``a/__init__`` and
``a/b/__init__`` first, so an edge also goes to each enclosing package of the target, except the
packages that enclose the importing module itself (they are already being initialised then).
Not seen: ``importlib.import_module`` by name, which only training/commands.py uses (to run the
module a console command names; nothing imports commands.py, so it cannot close a cycle).
"""
import ast
import os
from typing import Dict, List, Optional, Set

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "training"


def module_files(package_dir: str, package: str) -> Dict[str, str]:
    """Dotted module name -> file, for every .py file under ``package_dir``."""
    modules = {}
    for folder, _, files in os.walk(package_dir):
        rel = os.path.relpath(folder, os.path.dirname(package_dir))
        prefix = rel.replace(os.sep, ".")
        for name in files:
            if not name.endswith(".py"):
                continue
            dotted = prefix if name == "__init__.py" else f"{prefix}.{name[:-3]}"
            modules[dotted] = os.path.join(folder, name)
    assert package in modules
    return modules


def _absolute(module: str, is_package: bool, level: int, target: Optional[str]) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    if level > 1:
        base = base[:len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def imports_of(module: str, path: str, modules: Dict[str, str]) -> Set[str]:
    """The package modules that ``module`` imports (with their enclosing packages)."""
    is_package = path.endswith("__init__.py")
    targets = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, is_package, node.level, node.module) if node.level else node.module
            targets.add(base)
            # `from pkg import name`: name may be a submodule of pkg.
            targets.update(f"{base}.{alias.name}" for alias in node.names)
    own_parents = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
    if is_package:
        own_parents.add(module)
    edges = set()
    for target in targets:
        parts = target.split(".")
        for i in range(1, len(parts) + 1):
            name = ".".join(parts[:i])
            if name in modules and name not in own_parents and name != module:
                edges.add(name)
    return edges


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One cycle of ``graph`` as a closed path ``[a, b, ..., a]``, or None."""
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path: List[str] = []

    def visit(node: str) -> Optional[List[str]]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def import_graph(package: str = PACKAGE) -> Dict[str, Set[str]]:
    modules = module_files(os.path.join(ROOT, package), package)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def test_find_cycle_finds_a_cycle_and_only_a_cycle():
    # The checker itself: a wrong one that never reports would pass the real test.
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_relative_imports_resolve_to_package_modules():
    graph = import_graph()
    # Top-level, function-level and `from .. import module` forms are all seen.
    assert "training.config" in graph["training.engine.loop"]
    assert "training.data.sysu" in graph["training.visualize"]  # inside a function
    assert "training.validators" in graph["training.recipes.lba"]  # from .. import validators
    assert "training.data" in graph["training.data.check"] or "training.data.common" in graph["training.data.check"]
    assert "training.data" not in graph["training.data.check"]  # its own package is not an edge
    assert len(graph) > 30


def test_training_import_graph_has_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_errors_module_is_at_the_bottom():
    assert import_graph()["training.errors"] == set()
    assert import_graph()["training.cli"] == {"training.errors"}
