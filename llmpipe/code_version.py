"""A stage's code version: sha256 over the `llmpipe` modules its code imports, found by parsing.

The closure starts at the stage's module and follows every `import` that runs when it is
imported: module level and inside functions (they run when the stage runs), but not under
`if __name__ == "__main__":` (that runs only as a script). A package `__init__` on the path of
an imported module counts with its own source; its imports are followed only when a name is
imported from the package itself (`from llmpipe.model import Transformer`), since only then
does the stage use what the `__init__` gathers. So adding a module that nothing imports, or
editing one the stage never reaches, leaves the stage cached.

Some modules are left out on purpose, as none of them can change a stage's outputs:
`llmpipe.config` and its section modules (what it decides is the resolved config, which the config hash covers, so
adding another stage's section does not rerun every stage), `llmpipe.stages` (the executor and
the registry), and `llmpipe.console`, `llmpipe.progress`, `llmpipe.tracking` (what the terminal
and MLflow show).
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import threading
from pathlib import Path

PACKAGE = "llmpipe"
SOURCE_ROOT = Path(__file__).resolve().parent.parent  # the folder holding the `llmpipe` package
# CPython 3.11's parser is not safe in threads ("AST constructor recursion depth mismatch" when two
# stages of a flow compute their code versions at once: cpython#106905)
_PARSING = threading.Lock()
NOT_CODE = frozenset({"llmpipe.config", "llmpipe.stages", "llmpipe.console", "llmpipe.progress", "llmpipe.tracking"})


def module_file(module: str, root: Path) -> Path | None:
    """The source of `module`: below `root` for llmpipe modules, wherever Python finds it otherwise."""
    if module.split(".")[0] == PACKAGE:
        base = root.joinpath(*module.split("."))
        for candidate in (base / "__init__.py", base.with_suffix(".py")):
            if candidate.is_file():
                return candidate
        return None
    spec = importlib.util.find_spec(module)
    return Path(spec.origin) if spec is not None and spec.origin and spec.origin.endswith(".py") else None


def _is_main_guard(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return (isinstance(node, ast.If) and isinstance(test, ast.Compare) and isinstance(test.left, ast.Name)
            and test.left.id == "__name__")


def _import_nodes(tree: ast.AST):
    """Every import statement, except those that only run when the file is a script."""
    todo = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif not _is_main_guard(node):
            todo.extend(ast.iter_child_nodes(node))


def _imports(module: str, path: Path, root: Path) -> tuple[set[str], set[str]]:
    """(modules imported by name, packages a name is imported from) inside llmpipe."""
    is_package = path.name == "__init__.py"
    modules, from_packages = set(), set()
    with _PARSING:
        tree = ast.parse(path.read_text(), filename=str(path))
    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            modules |= {alias.name for alias in node.names}
            continue
        base = node.module or ""
        if node.level:
            parts = module.split(".") if is_package else module.split(".")[:-1]
            parts = parts[:len(parts) - (node.level - 1)]
            base = ".".join([*parts, base] if base else parts)
        for alias in node.names:
            if _counts(base) and module_file(f"{base}.{alias.name}", root) is not None:
                modules.add(f"{base}.{alias.name}")  # a submodule: from llmpipe.training import checkpoint
            else:
                from_packages.add(base)  # a name from the module (or package) itself
        modules.add(base)
    return {n for n in modules if _counts(n)}, {n for n in from_packages if _counts(n)}


def _counts(module: str) -> bool:
    """Inside llmpipe and part of a stage's computation."""
    return (module == PACKAGE or module.startswith(PACKAGE + ".")) and not any(
        module == name or module.startswith(name + ".") for name in NOT_CODE)


def module_closure(modules: list[str], root: Path | None = None) -> list[Path]:
    """The files of `modules` and of every llmpipe module they import, transitively, sorted."""
    root = root or SOURCE_ROOT
    files: set[Path] = set()
    followed: set[str] = set()
    todo = [(m, True) for m in modules]
    while todo:
        module, follow = todo.pop()
        path = module_file(module, root)
        if path is None:
            continue
        files.add(path)
        parts = module.split(".")
        for depth in range(1, len(parts)):  # the packages on the path: their own source only
            parent = ".".join(parts[:depth])
            if _counts(parent):
                todo.append((parent, False))
        if not follow or module in followed:
            continue
        followed.add(module)
        imported, from_packages = _imports(module, path, root)
        todo += [(name, name not in _packages(imported, root) or name in from_packages) for name in imported]
    return sorted(files)


def _packages(names: set[str], root: Path) -> set[str]:
    return {n for n in names if (p := module_file(n, root)) is not None and p.name == "__init__.py"}


def code_version(modules: list[str], root: Path | None = None) -> str:
    """sha256 over (path relative to its root, bytes) of the closure: the same code gives the same version anywhere."""
    root = root or SOURCE_ROOT
    digest = hashlib.sha256()
    for path in module_closure(modules, root):
        name = path.relative_to(root) if path.is_relative_to(root) else Path(path.name)
        digest.update(str(name).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()
