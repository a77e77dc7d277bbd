"""The code's shape: the package's modules import one another one way (the graph of their imports, those inside
functions included and type-checking-only ones not, since they never run, has no cycle), and functions fit a screen."""

import ast
import graphlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "sslens"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_imports(path: Path) -> set[str]:
    """The sslens modules `path` imports when it runs."""
    name, tree = module_name(path), ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    skipped = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for stmt in node.body
        for n in ast.walk(stmt)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("sslens")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            if base.startswith("sslens"):
                found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    # a module's imports, restricted to modules (`from .x import y` names a module only when y is one)
    return {name: {m for m in runtime_imports(p) if m in files and m != name} for name, p in files.items()}


def test_the_import_graph_is_found():
    graph = import_graph()
    assert {"sslens.generate", "sslens.kvcache", "sslens.inductor", "sslens.hf"} <= graph[
        "sslens.model"
    ]  # in functions too
    assert "sslens.model" in graph["sslens.train"] and "sslens.config" in graph["sslens.model"]
    assert "sslens.model" not in graph["sslens.generate"]  # its HookedLlama import is for type checking only


def test_no_import_cycle():
    graph = import_graph()
    # the package's __init__ (re-exporting the public API) runs before any of its modules, whatever they import
    graph.pop("sslens")
    graph = {m: deps - {"sslens"} for m, deps in graph.items()}
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as e:
        pytest.fail(f"import cycle: {' -> '.join(e.args[1])}")


def test_no_function_is_longer_than_a_screen():
    """Every function fits in 60 lines, `train` (the loop a reader should see whole) in 40; the argparse table
    (`cli.parser`, declarations only) is the one exception."""
    long = []
    for path in [*PACKAGE.rglob("*.py"), *PACKAGE.parent.joinpath("apps").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                limit = 40 if (path.name, node.name) == ("train.py", "train") else 60
                if lines > limit and (path.name, node.name) != ("cli.py", "parser"):
                    long.append(f"{path.name}:{node.name} ({lines} lines)")
    assert not long, long
