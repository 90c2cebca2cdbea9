"""The core's shape (issue 17): its modules import each other without a cycle (type-only
imports included), no module reaches into another's underscore names, no class is much over
300 lines and no function over 60. Read from the source with ``ast``, nothing imported."""

from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parents[1] / "src" / "ikkuna_core"
PACKAGE = "ikkuna_core"
MAX_CLASS, MAX_FUNCTION = 300, 60


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(CORE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _trees() -> dict[str, tuple[Path, ast.Module]]:
    return {_module_name(p): (p, ast.parse(p.read_text())) for p in sorted(CORE.rglob("*.py"))}


def _imports(name: str, path: Path, tree: ast.Module, modules: set[str]) -> set[str]:
    """The core modules ``name`` imports, at run time or for types: ``from .x import y``
    counts as an import of ``x.y`` when that is a module, else of ``x``."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
            if node.level:
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in modules else target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m in modules and m != name}


def test_core_modules_import_each_other_without_a_cycle() -> None:
    trees = _trees()
    modules = set(trees)
    graph = {m: _imports(m, *trees[m], modules) for m in modules}
    cycles = []
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                cycles.append([*path[path.index(dep):], dep])
            elif dep not in state:
                visit(dep, [*path, dep])
        state[module] = 2

    for module in sorted(modules):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles


def _own_underscore_names(tree: ast.Module) -> set[str]:
    """Underscore names a module defines: module-level, methods, ``self._x`` attributes."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and _private(node.name):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            if _private(node.attr):
                names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store) and _private(node.id):
            names.add(node.id)
        elif (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Attribute)
              and _private(node.target.attr)):
            names.add(node.target.attr)
    return names


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_module_reaches_into_another_modules_underscore_names() -> None:
    trees = _trees()
    own = {m: _own_underscore_names(tree) for m, (_, tree) in trees.items()}
    everyone = set().union(*own.values())
    reaches = []
    for module, (path, tree) in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                reaches += [f"{module}: from {'.' * node.level}{node.module or ''} import "
                            f"{a.name}" for a in node.names
                            if _private(a.name) and (node.level or PACKAGE in (node.module or ""))
                            and not _is_private_package(node, a.name)]
            if not isinstance(node, ast.Attribute) or not _private(node.attr):
                continue
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                continue
            # a name that some other core module defines and this one does not
            if node.attr in everyone and node.attr not in own[module]:
                reaches.append(f"{path.relative_to(CORE)}:{node.lineno}: .{node.attr}")
    assert not reaches, reaches


def _is_private_package(node: ast.ImportFrom, name: str) -> bool:
    """``from . import _bus`` or ``from ._bus import X`` name a private *module* of the
    core, which its own package may import."""
    return (CORE / name).is_dir() or (CORE / f"{name}.py").exists()


def test_no_class_over_300_lines_and_no_function_over_60() -> None:
    too_long = []
    for module, (_, tree) in _trees().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                assert node.end_lineno is not None
                lines = node.end_lineno - node.lineno + 1
                limit = MAX_CLASS if isinstance(node, ast.ClassDef) else MAX_FUNCTION
                if lines > limit:
                    too_long.append(f"{module}.{node.name}: {lines} lines")
    assert not too_long, too_long


def test_the_checks_above_can_fail(tmp_path: Path) -> None:
    """The cycle finder and the reach finder see what they look for."""
    a = ast.parse("from .b import x\nimport ikkuna_core.c\n")
    found = _imports("ikkuna_core.a", CORE / "a.py", a,
                     {"ikkuna_core.a", "ikkuna_core.b", "ikkuna_core.c"})
    assert found == {"ikkuna_core.b", "ikkuna_core.c"}
    tree = ast.parse("class A:\n    def _secret(self):\n        self._state = 1\n")
    assert _own_underscore_names(tree) == {"_secret", "_state"}
