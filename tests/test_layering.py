"""The package's layering: library modules never load the command line or the converter, and no two modules import
each other (directly or through others)."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import m2d2_hf


PACKAGE_DIR = Path(m2d2_hf.__file__).parent
# The command line turns library errors into messages and drives the converter; the converter is its own program
# layer. Both may load each other; nothing else may load either.
UPPER_LAYERS = ("m2d2_hf.cli", "m2d2_hf.conversion")

# Runs in a fresh interpreter: imports each module in turn and records which upper layers each one loaded (removing
# them again, so that the next module is judged on its own imports). A module whose optional extra is missing here
# (faiss, fastapi, ...) is reported as skipped rather than failing the layering check.
PROBE = """
import importlib, json, sys
upper, found, skipped = {upper!r}, {{}}, {{}}
for name in {modules!r}:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name and error.name.split(".")[0] == "m2d2_hf":
            raise
        skipped[name] = error.name
    loaded = [layer for layer in upper if layer in sys.modules]
    if loaded:
        found[name] = loaded
        for layer in loaded:
            del sys.modules[layer]
print(json.dumps({{"found": found, "skipped": skipped}}))
"""


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE_DIR.rglob("*.py"))}


def import_nodes(tree: ast.AST, in_functions: bool):
    """The import statements of `tree`; with `in_functions=False` only those that run when the module is imported."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif in_functions or not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield from import_nodes(node, in_functions)


def imported_modules(name: str, path: Path, modules: dict[str, Path], in_functions: bool) -> set[str]:
    """The package modules `path` imports at import time, and with `in_functions` also inside its functions."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in import_nodes(ast.parse(path.read_text(encoding="utf-8")), in_functions):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            base = base[: len(base) - node.level + 1] if node.level else []
            stem = ".".join(base + (node.module.split(".") if node.module else []))
            targets.add(stem)
            targets.update(f"{stem}.{alias.name}" for alias in node.names)  # `from . import module`
    return {target for target in targets if target in modules and target != name}


def test_library_modules_load_neither_the_cli_nor_the_converter():
    library = [name for name in package_modules() if name not in UPPER_LAYERS]
    probe = PROBE.format(upper=UPPER_LAYERS, modules=library)
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["found"] == {}, f"library modules load upper layers: {report['found']}"
    assert len(report["skipped"]) < len(library) // 2, f"too many modules skipped: {report['skipped']}"


DATA_MODULES = {"m2d2_hf.data", "m2d2_hf.data.audio", "m2d2_hf.data.sources", "m2d2_hf.data.labels"}


def test_the_data_layer_is_probed_and_sits_below_its_users():
    """Every module of m2d2_hf/data is among those the probe above imports, and the data layer imports only itself:
    training, evaluation, search and the command line read through it, never the other way round."""
    modules = package_modules()
    assert DATA_MODULES <= {name for name in modules if name not in UPPER_LAYERS}
    assert {name for name in modules if name.startswith("m2d2_hf.data")} == DATA_MODULES
    for name in DATA_MODULES:
        imported = imported_modules(name, modules[name], modules, in_functions=True)
        assert imported <= DATA_MODULES, f"{name} imports {sorted(imported - DATA_MODULES)}"
    users = ("m2d2_hf.training.data", "m2d2_hf.evaluation.data", "m2d2_hf.search.sources", "m2d2_hf.cli")
    for name in users:
        assert imported_modules(name, modules[name], modules, in_functions=False) & DATA_MODULES, name


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None (depth-first search with the current path on a stack)."""
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target, path)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node, [])):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def import_graph(in_functions: bool) -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imported_modules(name, path, modules, in_functions) for name, path in modules.items()}


def test_no_import_cycle_at_import_time():
    graph = import_graph(in_functions=False)
    assert graph["m2d2_hf.evaluation.zero_shot"] >= {"m2d2_hf.prompts", "m2d2_hf.evaluation.data"}
    assert find_cycle(graph) is None


def test_no_import_cycle_in_the_package():
    """Imports inside functions count too: long-audio embedding is built on the model's public methods and the model
    module imports it, never the other way round."""
    graph = import_graph(in_functions=True)
    assert "m2d2_hf.long_audio" in graph["m2d2_hf.modeling_m2d2"]
    assert "m2d2_hf.modeling_m2d2" not in graph["m2d2_hf.long_audio"]
    assert find_cycle(graph) is None
