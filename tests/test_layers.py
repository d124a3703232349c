"""The library's layers import downward only (ARCHITECTURE.md, "Layers").

Every ``import`` of an ``fsdp_compile`` module, at module level or inside a function, is read
from the source with ``ast`` (imports under ``if TYPE_CHECKING:`` are annotations only and are
skipped) and must name a module of a lower layer than the importer's. This is what keeps, for
example, ``Unit`` from calling back into the runtime that drives it.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Lowest first. A module may import modules of earlier entries only (and itself's package).
LAYERS = [
    "torch_private", "config", "log", "failures", "gloo_worker", "mesh", "consistency", "layout", "tensor_parallel", "kernels",
    "collectives", "registry", "unit", "unit_runtime", "ops", "runtime", "state_dict", "params", "nested", "deferred_init", "api",
    "passes",
    "compiler", "explain", "full_params", "testing", "estimate",
]


def _layer_of(module: str) -> str:
    """``fsdp_compile.kernels.ops`` -> ``kernels``; ``fsdp_compile.passes.reorder`` -> ``passes``;
    a name the package exports (``fsdp_compile.MixedPrecision``) -> ``__init__``."""
    parts = module.split(".")
    if len(parts) < 2:
        return "__init__"
    pkg = REPO / "fsdp_compile"
    if parts[1] == "passes" or (pkg / f"{parts[1]}.py").exists() or (pkg / parts[1]).is_dir():
        return parts[1]
    return "__init__"


def _sources():
    for path in sorted((REPO / "fsdp_compile").rglob("*.py")):
        rel = path.relative_to(REPO / "fsdp_compile").with_suffix("")
        yield "fsdp_compile." + ".".join(rel.parts), path
    for path in sorted((REPO / "passes").glob("*.py")):
        yield "fsdp_compile.passes." + path.stem, path


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(module: str, path: Path) -> list[str]:
    """Absolute names of the fsdp_compile modules ``path`` imports (TYPE_CHECKING blocks skipped)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    if module.startswith("fsdp_compile.passes"):
        package = "fsdp_compile.passes"
    found = []

    def visit(node):
        if isinstance(node, ast.If) and _is_type_checking(node):
            return
        if isinstance(node, ast.Import):
            found.extend(a.name for a in node.names if a.name.startswith("fsdp_compile"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("fsdp_compile"):
                if node.module is None or target.count(".") == 0:
                    found.extend(f"{target}.{a.name}" for a in node.names)
                else:
                    found.append(target)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def _violations() -> list[str]:
    bad = []
    for module, path in _sources():
        own = _layer_of(module)
        if own == "__init__":
            continue  # the package's front door imports whatever it exports
        for target in _imports(module, path):
            other = _layer_of(target)
            if other == own or other == "__init__":
                continue
            if other not in LAYERS or own not in LAYERS:
                bad.append(f"{module} -> {target}: layer missing from LAYERS")
            elif LAYERS.index(other) > LAYERS.index(own):
                bad.append(f"{module} ({own}) imports {target} ({other}), a higher layer")
    return bad


def _check_probe(path: Path) -> list[str]:
    """What ``_violations`` says of ``path`` read as fsdp_compile.registry."""
    return [
        f"fsdp_compile.registry imports {t}, a higher layer"
        for t in _imports("fsdp_compile.registry", path)
        if LAYERS.index(_layer_of(t)) > LAYERS.index("registry")
    ]


def test_every_import_goes_down_a_layer():
    assert _violations() == []


def test_the_check_sees_a_violation(tmp_path):
    """The checker is not vacuous: registry.py's TYPE_CHECKING import of the unit's runtime
    record is skipped, and the same import outside that block would be reported."""
    path = REPO / "fsdp_compile" / "registry.py"
    assert "fsdp_compile.unit_runtime" not in _imports("fsdp_compile.registry", path)
    assert "from .unit_runtime import UnitRuntime" in path.read_text()  # present, under TYPE_CHECKING
    probe = tmp_path / "registry.py"
    probe.write_text("from .unit_runtime import UnitRuntime\n")
    assert _imports("fsdp_compile.registry", probe) == ["fsdp_compile.unit_runtime"]
    assert any("a higher layer" in v for v in _check_probe(probe))


@pytest.mark.parametrize("name", ["fsdp_compile.passes.reorder", "fsdp_compile.passes.reshard", "fsdp_compile.unit"])
def test_any_module_imports_first(name, imported_first):
    """Each module imports on its own in a fresh interpreter (no partially initialized module);
    ``imported_first`` (tests/conftest.py) imports every pass and the unit layer in one."""
    code, text = imported_first[name]
    assert code == 0, text[-2000:]
