"""The shape of the code base: no import cycle inside vsonnx, no over-long function, one method registry."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vsonnx"
MAX_FUNCTION_LINES = 60


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """Every vsonnx module ``path`` imports, at module level or inside a function (lazy imports count too:
    they are cycles that only wait for the right call order)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # `from . import x` names a module or something defined in the package
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {m for m in found if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imported_modules(path, set(files)) for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle():
    graph = import_graph()
    # the package facade imports its modules lazily; modules never import the facade
    graph["vsonnx"] = set()
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_modules_do_not_import_the_facade():
    offenders = sorted(m for m, deps in import_graph().items() if "vsonnx" in deps and m != "vsonnx")
    assert offenders == []


@pytest.mark.parametrize("folder", ["vsonnx", "tools"])
def test_functions_are_short(folder):
    long = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.name} ({lines} lines)")
    assert long == []


def test_cli_method_choices_come_from_the_registry():
    import click

    from vsonnx.cli import fix
    from vsonnx.methods import CALIBRATED, REGISTRY

    method = next(p for p in fix.params if p.name == "method")
    assert isinstance(method.type, click.Choice) and tuple(method.type.choices) == CALIBRATED
    assert set(CALIBRATED) <= set(REGISTRY)
    for entry in REGISTRY.values():  # every entry points at a module with an estimator
        assert callable(entry.estimate)


MAX_MODULE_LINES = 450


def test_modules_are_short():
    long = [f"{p.relative_to(ROOT)} ({n} lines)" for p in sorted(PACKAGE.rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES]
    assert long == []


def layout_block() -> list[str]:
    """The lines of the README's module map under ``vsonnx/``, up to ``tools/``."""
    lines = (ROOT / "README.md").read_text().split("## Layout", 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "vsonnx/")
    end = next(i for i, line in enumerate(lines) if line.strip().startswith("tools/"))
    return lines[start + 1:end]


def test_readme_module_map_matches_the_tree_and_the_import_order():
    """Every module and package of vsonnx/ is in the README's map (and nothing else), in an order where each
    module imports only modules listed above it (what the map promises)."""
    import re

    block = layout_block()
    listed: list[str] = []
    for line in block:
        head = line[:23].strip()  # the name column
        listed += [n.strip() for n in head.split(",") if n.strip()]
    on_disk = {p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py", "_version.py")}
    on_disk |= {p.name + "/" for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert sorted(listed) == sorted(on_disk)
    data_modules = {p.name for p in (PACKAGE / "data").glob("*.py") if p.name != "__init__.py"}
    assert data_modules <= set(re.findall(r"(\w+\.py)", "\n".join(block)))
    order = {name.removesuffix(".py").removesuffix("/"): k for k, name in enumerate(listed)}
    graph = import_graph()
    late = []
    for module, deps in graph.items():
        top = module.split(".")[1] if module.count(".") >= 1 else None
        if top not in order:
            continue
        for dep in deps:
            other = dep.split(".")[1] if dep.count(".") >= 1 else None
            if other in order and other != top and order[other] > order[top]:
                late.append(f"{module} imports {dep}")
    assert late == []
