"""The house is layered: every import of a popdsl module points down the layers
(README, "Layout"), never up and never in a circle.  A lazy import inside a function
counts as much as one at the top."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "popdsl"

# Bottom up.  A module may import modules of its own layer and of the layers below.
LAYERS = (
    ("node", "diagnostics", "resources", "limits", "atomic", "timings", "forked"),
    ("frontend",),
    ("ir",),
    ("ops",),
    ("sema",),
    ("codegen",),
    ("passes",),
    ("runtime",),
    ("report", "artifact", "artifact_load", "data", "datafile"),
    ("pipeline", "recompute_auto"),
    ("cache",),
    ("api",),
    ("training",),
    ("cli", "__main__"),
)
LEVEL = {unit: k for k, units in enumerate(LAYERS) for unit in units}


def unit_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "popdsl" else None


def imports(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.lineno, node.module
            if node.module == "popdsl":
                for a in node.names:
                    yield node.lineno, f"popdsl.{a.name}"


def test_every_unit_has_a_layer():
    units = {p.stem if p.parent == PKG else p.relative_to(PKG).parts[0] for p in PKG.rglob("*.py")}
    units.discard("__init__")
    assert units <= set(LEVEL), f"modules without a layer: {sorted(units - set(LEVEL))}"


def test_imports_point_down():
    upward = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG)
        here = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        if here == "__init__":
            continue                     # the package's face imports its API
        for line, target in imports(path):
            there = unit_of(target)
            if there is None or there == "__version__":
                continue
            if LEVEL[there] > LEVEL[here]:
                upward.append(f"popdsl/{rel}:{line}: {here} imports {target} ({there} is above {here})")
    assert not upward, "imports that point up:\n" + "\n".join(upward)
