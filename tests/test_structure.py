"""The shape of the package, kept by tests: small modules, no import cycles, no private
names borrowed across modules, one forward path."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pipeline"
MAX_LINES = 450


def _modules() -> dict[str, Path]:
    """Dotted name inside the package ("forward", "finetuning.loop") -> file."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(name: str, path: Path) -> list[tuple[str, list[str]]]:
    """(imported package module, names) for every import in the file, nested ones too."""
    package = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".")
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1] if node.level > 1 else package
                module = ".".join([p for p in base if p] + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] in ("tlp", "pipeline"):
                module = node.module.partition(".")[2]
            else:
                continue
            found.append((module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in ("tlp", "pipeline"):
                    found.append((alias.name.partition(".")[2], []))
    return found


def test_no_module_is_over_450_lines():
    long = {name: len(path.read_text().splitlines()) for name, path in _modules().items()}
    assert {name: n for name, n in long.items() if n > MAX_LINES} == {}


def test_no_import_cycles_among_the_modules():
    """Function-level imports count too. The package's __init__ only loads modules lazily
    and is left out."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        targets = set()
        for module, names in _imports(name, path):
            candidates = [f"{module}.{n}" if module else n for n in names] + [module]
            targets |= {c for c in candidates if c in modules and c != ""}
        graph[name] = targets - {name, ""}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(target):] + [target]))
            if target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node and node not in state:
            visit(node)


@pytest.mark.parametrize("folder", ["pipeline", "tests", "benchmarks"])
def test_no_private_name_is_imported_across_modules(folder):
    """Private modules (``_sweep``) may be imported; private names (``_folds``) may not."""
    borrowed = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            ours = node.level or (node.module or "").split(".")[0] in ("tlp", "pipeline")
            for alias in node.names if ours else ():
                if alias.name.startswith("_") and alias.name != "__version__":
                    borrowed.append(f"{path.relative_to(ROOT)}: {alias.name} from {node.module or '.'}")
    assert borrowed == []


def _calls(path: Path) -> set[str]:
    return {node.func.id if isinstance(node.func, ast.Name) else node.func.attr
            for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Call)
            and isinstance(node.func, (ast.Name, ast.Attribute))}


def test_one_forward_path():
    """Decoding, pooling and the inference forward pass each have one home; extraction,
    prediction and fine-tuning's evaluation all go through tlp.forward."""
    modules = _modules()
    homes = {"decode_image": {"preprocess"}, "pool": {"forward"}, "build_tap_extractor": {"forward"},
             "load_pixels": {"forward", "finetuning.augment"}}
    for function, allowed in homes.items():
        callers = {name for name, path in modules.items() if function in _calls(path)}
        assert callers <= allowed, f"{function} is called in {sorted(callers - allowed)}"
    for user in ("_extract", "_predict", "finetuning.loop"):
        assert {"Forward", "for_taps"} & _calls(modules[user]), user
