"""The layers of mokd import only downward (docs: DESIGN section 3). Read from the source with `ast`, nothing is
imported; imports inside functions count as much as those at the top of a module."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mokd"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path: Path) -> set[str]:
    """Every dotted name the module imports: `import a.b` gives a.b, `from a import b` gives a and a.b (b may
    be a module); relative imports are resolved against the module's package."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph() -> dict[str, set[str]]:
    """{module of mokd: the mokd names it imports}."""
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        graph[module_name(path)] = {name for name in imported_names(path) if name.split(".")[0] == "mokd"}
    return graph


def within(name: str, layer: str) -> bool:
    return name == layer or name.startswith(layer + ".")


def upward_imports(importers: str, above: tuple[str, ...]) -> list[str]:
    """'module -> name' for every import by a module of `importers` of a name in one of the `above` layers."""
    graph = import_graph()
    assert any(within(module, importers) for module in graph), f"no module of {importers} found under {PACKAGE}"
    return sorted(f"{module} -> {name}" for module, names in graph.items() if within(module, importers)
                  for name in names if any(within(name, layer) for layer in above))


def test_import_graph_sees_imports_at_every_depth():
    """The graph the rules read holds top-level imports, `from package import module` and in-function imports."""
    graph = import_graph()
    assert "mokd.data" in graph["mokd.engine.train_data"]
    assert "mokd.kernels.native" in graph["mokd.kernels.ema"]  # `from mokd.kernels import native`
    assert "mokd.eval.run_evaluation" in graph["mokd.launch.cli"]  # imported inside a function


def test_import_graph_data_never_imports_engine():
    assert upward_imports("mokd.data", ("mokd.engine", "mokd.launch", "mokd.eval")) == []


def test_import_graph_kernels_import_nothing_above_them():
    assert upward_imports("mokd.kernels", ("mokd.method", "mokd.engine", "mokd.launch", "mokd.eval")) == []


def test_import_graph_ground_floor_imports_no_layer():
    """errors and signals are used by every layer, so they import none."""
    layers = ("mokd.config", "mokd.kernels", "mokd.method", "mokd.data", "mokd.engine", "mokd.eval", "mokd.launch")
    for module in ("mokd.errors", "mokd.signals"):
        assert upward_imports(module, layers) == []


def test_import_graph_registry_imports_nothing_of_mokd_but_errors():
    """Any layer may own a registry, so the registry module may import no other module of mokd."""
    assert sorted(name for name in import_graph()["mokd.registry"] if not within(name, "mokd.errors")) == []


def test_import_graph_schema_imports_nothing_of_mokd_but_errors():
    """The schema is the ground floor: the components register their own checks into it (component_check)."""
    assert sorted(name for name in import_graph()["mokd.config"] if not within(name, "mokd.errors")) == []
