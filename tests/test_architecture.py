"""The layers import one way: common (what every layer shares) <- serving (torch-free batch job) <- nn_core
(torch) <- flows (Prefect, CLI).

Read from the source (every import statement, also those inside functions), so a lazy import that
would only run on some code path counts too; plus a real import of every serving module in a fresh
interpreter, which must leave torch and prefect unloaded.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "serving", "nn_core", "flows")
# What each layer may import from the project: only the layers below it.
ALLOWED = {"common": {"common"}, "serving": {"common", "serving"}, "nn_core": {"common", "serving", "nn_core"},
           "flows": {"common", "serving", "nn_core", "flows"}}
FORBIDDEN_THIRD_PARTY = {"common": {"torch", "torchvision", "prefect", "onnx", "onnxscript", "matplotlib", "onnxruntime"},
                         "serving": {"torch", "torchvision", "prefect", "onnx", "onnxscript", "matplotlib"},
                         "nn_core": {"prefect"}}
# What the command line imports to build its options and check them: before torch, Prefect or
# onnxruntime is loaded (a typo costs a fraction of a second and one line).
PARSE_TIME = ("flows.options", "nn_core.config", "nn_core.sweep", "serving.config", "common.fields")
HEAVY = {"torch", "torchvision", "prefect", "onnxruntime", "onnx", "mlflow", "pyarrow", "matplotlib"}
MAX_FUNCTION_LINES = 50  # a function fits on a screen


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imports(name: str, path: Path, module_level: bool = False) -> set[str]:
    """Every module `path` imports, absolute names, function-level imports included (with
    `module_level`: only what importing the module itself imports)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    nodes = [n for stmt in tree.body for n in ast.walk(stmt) if not isinstance(stmt, (ast.FunctionDef, ast.ClassDef))] \
        if module_level else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            # `from pkg import module` imports a module too
            found |= {f"{mod}.{a.name}" for a in node.names}
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    edges = {}
    for name, path in modules.items():
        edges[name] = {m for m in _imports(name, path) if m in modules and m != name}
    return edges


def _all_imports() -> dict[str, set[str]]:
    return {name: _imports(name, path) for name, path in _modules().items()}


@pytest.mark.parametrize("layer", PACKAGES)
def test_each_layer_imports_only_the_layers_below_it(layer):
    wrong = {name: sorted(m for m in imps if m.split(".")[0] in PACKAGES and m.split(".")[0] not in ALLOWED[layer])
             for name, imps in _all_imports().items() if name.split(".")[0] == layer}
    wrong = {k: v for k, v in wrong.items() if v}
    assert not wrong, f"upward imports from {layer}: {wrong}"


def _reached(start: str, graph: dict[str, set[str]], imports: dict[str, set[str]]) -> set[str]:
    """The top-level packages `start` imports, directly or through any project module it imports."""
    seen, stack = {start}, [start]
    while stack:
        for nxt in graph[stack.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return {m.split(".")[0] for s in seen for m in imports[s]}


@pytest.mark.parametrize("layer", sorted(FORBIDDEN_THIRD_PARTY))
def test_forbidden_libraries_are_not_reached(layer, graph):
    """Directly, or through any project module the layer's modules import."""
    imports = _all_imports()
    bad = {start: sorted(_reached(start, graph, imports) & FORBIDDEN_THIRD_PARTY[layer])
           for start in graph if start.split(".")[0] == layer}
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, f"{layer} reaches {bad}"


@pytest.mark.parametrize("module", PARSE_TIME)
def test_what_the_command_line_parses_with_is_light(module):
    """Importing it (and what it imports on import) loads nothing heavy; that its checks import
    nothing heavy either is shown by running them (tests/test_cli.py)."""
    modules = _modules()
    imports = {name: _imports(name, path, module_level=True) for name, path in modules.items()}
    graph = {name: {m for m in imps if m in modules and m != name} for name, imps in imports.items()}
    assert not _reached(module, graph, imports) & HEAVY, sorted(_reached(module, graph, imports) & HEAVY)


def test_functions_fit_on_a_screen():
    long = []
    for path in sorted(p for pkg in (*PACKAGES, "bench") for p in (ROOT / pkg).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long


def test_no_import_cycles(graph):
    # Tarjan-free: a cycle exists iff a depth-first search meets a module still on its path.
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        path.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return path[path.index(m):] + [m]
            if m not in state and (cycle := visit(m)):
                return cycle
        path.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (cycle := visit(n)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_serving_imports_without_torch_or_prefect():
    mods = sorted(n for n in _modules() if n.split(".")[0] in ("common", "serving") and not n.endswith("__main__"))
    code = ("import importlib, sys\n"
            f"for m in {mods!r}: importlib.import_module(m)\n"
            "print(sorted({'torch', 'prefect', 'nn_core', 'flows'} & {k.split('.')[0] for k in sys.modules}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
