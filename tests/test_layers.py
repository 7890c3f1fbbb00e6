"""The layers of docs/architecture.md, checked on the code: a module imports only its own
layer and the layers below it (core < runtime < converters < cloud < demo < cli), and the
device layers (core, runtime) never import torch, transformers, peft or optimum at all."""

from __future__ import annotations

import ast
from pathlib import Path

import cdcca_edge

LAYERS = ["core", "runtime", "converters", "cloud", "demo", "cli"]
HEAVY = ("torch", "transformers", "peft", "optimum", "accelerate")
ROOT = Path(cdcca_edge.__file__).parent


def _imports(path: Path) -> list[str]:
    """Every module name a file imports (top level and inside functions)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
    return out


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "cdcca_edge" and parts[1] in LAYERS else None


def test_no_module_imports_a_layer_above_its_own():
    wrong = []
    for layer in LAYERS:
        for path in sorted((ROOT / layer).glob("*.py")):
            for module in _imports(path):
                other = _layer(module)
                if other is not None and LAYERS.index(other) > LAYERS.index(layer):
                    wrong.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not wrong, "\n".join(wrong)


def test_device_layers_never_name_the_heavy_packages():
    wrong = [f"{path.relative_to(ROOT)} imports {module}"
             for layer in ("core", "runtime") for path in sorted((ROOT / layer).glob("*.py"))
             for module in _imports(path) if module.split(".")[0] in HEAVY]
    assert not wrong, "\n".join(wrong)
