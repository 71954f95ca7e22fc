"""Data flows one way: every module imports only from its own layer or the layers below it (docs/architecture.md)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "elbolab"
# docs/architecture.md's order, lowest first; the modules of one entry form one layer.
LAYERS = [
    {"errors", "config", "version", "files", "random_state", "nn", "distributions", "programs", "param_store"},
    {"data"}, {"contract"}, {"models"}, {"guides"}, {"inference"}, {"analysis"}, {"families"}, {"runs"},
    {"cli_arguments", "cli", "__main__", "__init__"},
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def _layer(module: str) -> str:
    """``elbolab.analysis.gaps`` -> ``analysis``; ``elbolab`` (the whole package, which imports every layer) -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _own_layer(path: Path) -> str:
    return _layer(".".join(("elbolab", *path.relative_to(PACKAGE).with_suffix("").parts)))


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of elbolab in ``path``, those inside functions included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "elbolab"]
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, f"{path}:{node.lineno}: a relative import; elbolab's modules import absolutely"
            name = node.module or ""
            if name.split(".")[0] == "elbolab":
                found.append((node.lineno, name))
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer():
    assert {_own_layer(path) for path in MODULES} <= set(RANK)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_flow_down_the_layers(path):
    own = _own_layer(path)
    upward = [f"line {line}: {module}" for line, module in _imports(path) if RANK[_layer(module)] > RANK[own]]
    assert not upward, f"{path.relative_to(PACKAGE)} ({own}) imports from a higher layer: {upward}"
