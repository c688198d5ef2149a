"""The package's shape: dependencies point one way, no import cycle, small modules, thin CLI.

Every import counts, including those inside functions (they are how a cycle hides).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "crlnseg"

# Lower layers never import higher ones. Within a layer, the order of the list is allowed
# (e.g. method -> data for the views, train -> inference for validation), never the reverse.
LAYERS: list[list[str]] = [
    ["types", "errors", "console", "settings", "config", "signals", "metrics"],
    ["io", "nets", "checkpoint"],
    ["data", "method"],
    ["inference", "train"],
    ["synthetic", "prepare", "plan", "predict", "rectify", "evaluate", "demo"],
    ["cli", "__main__"],
]


def _modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(["crlnseg", *parts])] = path
    return found


MODULES = _modules()


def _imports(path: Path, name: str) -> set[str]:
    """Every crlnseg module ``name`` imports, at any depth of the file."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                out.add(full if full in MODULES else base)
    return {m for m in out if m in MODULES and m != name}


GRAPH = {name: _imports(path, name) for name, path in MODULES.items()}


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _rank(unit: str) -> tuple[int, int]:
    for level, units in enumerate(LAYERS):
        if unit in units:
            return level, units.index(unit)
    raise AssertionError(f"crlnseg.{unit} has no layer in tests/test_layout.py")


def test_every_module_has_a_layer():
    for module in MODULES:
        if _unit(module) != "__init__":
            _rank(_unit(module))


def test_dependencies_point_one_way():
    wrong = []
    for module, deps in GRAPH.items():
        if _unit(module) == "__init__":
            continue
        for dep in deps:
            if _unit(dep) == "__init__" or _unit(dep) == _unit(module):
                continue
            if _rank(_unit(dep)) > _rank(_unit(module)):
                wrong.append(f"{module} -> {dep}")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycle():
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for dep in sorted(GRAPH[module]):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)


def test_the_method_does_no_io_and_sets_no_device_policy():
    for module, path in MODULES.items():
        if not module.startswith("crlnseg.method."):
            continue
        text = path.read_text(encoding="utf-8")
        for word in ("open(", "torch.save", "torch.load", "is_bf16_supported", "Path("):
            assert word not in text, f"{module} uses {word}"
        assert not any(dep.startswith(("crlnseg.io", "crlnseg.checkpoint", "crlnseg.train"))
                       for dep in GRAPH[module]), module


def test_modules_stay_small():
    big = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > 400}
    assert not big, big


def test_cli_commands_are_thin():
    # A command body (after its parameter list) builds settings and calls one library function.
    for path in (ROOT / "cli").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef) and any(
                    isinstance(d, ast.Call) and getattr(d.func, "attr", "") == "command"
                    for d in node.decorator_list):
                body = node.body[0].lineno, node.body[-1].end_lineno
                assert body[1] - body[0] + 1 <= 40, f"{path.name}:{node.name}: {body}"
