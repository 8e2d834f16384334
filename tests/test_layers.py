"""tailor's modules import downward only (docs/ARCHITECTURE.md): a module may import its own layer
and the layers below it, never one above; and nothing imports in a circle."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "tailor"
# bottom to top
LAYERS = ["core", "data", "rewriter", "backends", "passes", "codegen", "runtime", "quality", "top", "cli"]


def layer_of(module: str) -> str:
    if module == "tailor.__main__":  # `python -m tailor`: the CLI
        return "cli"
    part = module.split(".")[1] if module.count(".") else "top"
    return part if part in LAYERS else "top"


def imports(path: Path) -> list[str]:
    """Every tailor module this file imports, at top level or inside functions."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "tailor":
                out += [f"tailor.{a.name}" for a in node.names]
            elif node.module.startswith("tailor."):
                out.append(node.module)
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.startswith("tailor.") or a.name == "tailor"]
    return out


def modules() -> dict[str, Path]:
    return {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
            for p in PACKAGE.rglob("*.py")}


@pytest.mark.parametrize("name", sorted(modules()))
def test_imports_go_downward(name):
    mine = LAYERS.index(layer_of(name))
    upward = [m for m in imports(modules()[name]) if LAYERS.index(layer_of(m)) > mine]
    assert not upward, f"{name} ({LAYERS[mine]}) imports a higher layer: {upward}"


def test_core_imports_nothing_else_of_tailor():
    for name, path in modules().items():
        if layer_of(name) == "core":
            assert all(layer_of(m) == "core" for m in imports(path)), name


def test_no_import_cycles():
    import networkx as nx

    known = modules()
    g = nx.DiGraph()
    for name, path in known.items():
        for m in imports(path):
            target = m if m in known else m.rsplit(".", 1)[0]
            if target in known and target != name:
                g.add_edge(name, target)
    cycles = [sorted(c) for c in nx.strongly_connected_components(g) if len(c) > 1]
    assert not cycles, cycles
