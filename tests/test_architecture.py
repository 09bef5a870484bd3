"""Import rules that keep the layers apart (see STYLE.md)."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _library_files(under="llmpipe"):
    return sorted((ROOT / under).rglob("*.py"))


def test_library_never_imports_prefect():
    offenders = [str(p) for p in _library_files() if any(n.split(".")[0] == "prefect" for n in _imports(p))]
    assert offenders == []
    loaded = subprocess.run([sys.executable, "-c", "import sys, llmpipe.cli, llmpipe.stages; "
                             "print('prefect' in sys.modules)"], capture_output=True, text=True, cwd=ROOT)
    assert loaded.stdout.strip() == "False", loaded.stderr


def test_only_distributed_touches_torch_distributed():
    offenders = [str(p) for p in _library_files()
                 if "distributed" not in p.relative_to(ROOT / "llmpipe").parts[:1]
                 and any(n.startswith("torch.distributed") for n in _imports(p))]
    assert offenders == []


def test_only_config_reads_yaml():
    offenders = [str(p) for p in _library_files() if "config" not in p.relative_to(ROOT / "llmpipe").parts[:1] and "yaml" in _imports(p)]
    assert offenders == []


def test_model_is_independent_of_training_and_tracking():
    offenders = [str(p) for p in _library_files("llmpipe/model")
                 if any(n.startswith(("llmpipe.training", "llmpipe.tracking", "mlflow")) for n in _imports(p))]
    assert offenders == []


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """llmpipe module -> the llmpipe modules it imports anywhere in its text (lazy imports count:
    they are circles that only wait for the right call); `from package import submodule` too."""
    files = {_module_name(p): p for p in _library_files()}
    graph = {}
    for name, path in files.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def test_no_import_circle_inside_the_library():
    import graphlib

    try:
        tuple(graphlib.TopologicalSorter(_import_graph()).static_order())
    except graphlib.CycleError as err:
        raise AssertionError(f"import circle: {' -> '.join(err.args[1])}") from None


def test_the_library_never_imports_its_cli():
    offenders = [name for name, targets in _import_graph().items() if "llmpipe.cli" in targets]
    assert offenders == []
