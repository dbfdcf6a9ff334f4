"""server/ is one folder per layer, and a layer imports only the layers below it (and the shared
config, errors and metrics modules at the root): serving → adapters → engine → model → lora → kernels."""

from __future__ import annotations

import ast
from pathlib import Path

SERVER = Path(__file__).resolve().parents[1] / "server"
LAYERS = ["kernels", "lora", "model", "engine", "adapters", "serving"]  # bottom to top
SHARED = {"config", "errors", "metrics"}


def server_imports(path: Path) -> set[str]:
    """The top-level names under server/ that a module imports (relative or absolute)."""
    package = list(path.relative_to(SERVER).parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                parts = base + (node.module.split(".") if node.module else [])
                names.update([parts[0]] if parts else [alias.name for alias in node.names])
            elif node.module and node.module.split(".")[0] == "server" and "." in node.module:
                names.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            names.update(a.name.split(".")[1] for a in node.names if a.name.startswith("server."))
    return names


def test_every_module_lives_in_a_layer_or_is_shared():
    loose = {p.stem for p in SERVER.glob("*.py")} - SHARED - {"__init__"}
    assert not loose, f"modules outside a layer folder: {sorted(loose)}"
    assert {p.name for p in SERVER.iterdir() if p.is_dir() and (p / "__init__.py").exists()} == set(LAYERS)


def test_imports_only_go_down():
    upward = []
    for layer in LAYERS:
        for path in sorted((SERVER / layer).rglob("*.py")):
            for name in server_imports(path) - SHARED:
                if name in LAYERS and LAYERS.index(name) > LAYERS.index(layer):
                    upward.append(f"{path.relative_to(SERVER)} imports {name}/")
    for name in SHARED:
        for imported in server_imports(SERVER / f"{name}.py"):
            if imported in LAYERS:
                upward.append(f"{name}.py imports {imported}/")
    assert not upward, "\n".join(upward)
