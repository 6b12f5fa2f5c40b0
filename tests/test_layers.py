"""The package's layers: a module never imports from a layer above its own (read from the
source, imports inside functions included), so the library never reaches the CLI, the
server or the benches, and the runtime never reaches the public API built on it."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "oc_engine"
LAYERS = [  # lowest first
    {"errors", "params", "outputs", "jsonl", "config_fields", "kernels", "data", "plots"},
    {"engine", "guard", "models", "config", "export"},
    {"llm", "async_llm", "__init__"},
    {"training", "bench", "server"},
    {"cli"},
]


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "oc_engine":
        return None
    top = parts[1] if len(parts) > 1 else "__init__"
    levels = [i for i, names in enumerate(LAYERS) if top in names]
    assert levels, f"{module} is in no layer: add its package to LAYERS"
    return levels[0]


def imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module, [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, []


def test_no_module_imports_from_a_layer_above_it():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        own = layer_of(module)
        for line, target, names in imports(path):
            # `from oc_engine import bench` names a package: judge what is imported, not `oc_engine`.
            targets = names if target == "oc_engine" else [target]
            for name in targets:
                level = layer_of(name)
                if level is not None and level > own:
                    upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}")
    assert not upward, "\n".join(upward)


def test_every_package_is_placed_in_a_layer():
    for path in PACKAGE.iterdir():
        if path.name.startswith(("_", ".")) or path.name == "assets":
            continue
        layer_of(f"oc_engine.{path.stem}")
