"""Imports go one way: no import cycle between reftlib's modules, not even through a function-level import.

The persistence layer (``io`` and the modules it re-exports) sits below ``model``; ``checks`` and
``merge`` never import ``model`` at run time (``checks`` recognizes a ReftModel through the class
``model`` registers). Old import paths keep working after the split.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import reftlib

SRC = Path(reftlib.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    modules = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


MODULES = _modules()


def _runtime_imports(name: str) -> set[str]:
    """The reftlib modules ``name`` imports at module or function level (``if TYPE_CHECKING:`` blocks excluded)."""
    path = MODULES[name]
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                target = f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                if target in MODULES and target != name:
                    found.add(target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in MODULES and alias.name != name)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (as a list of modules), or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return [*path[path.index(target):], target]
            if target not in state and (found := walk(target)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := walk(start)) is not None:
            return found
    return None


def test_no_import_cycle_between_modules():
    # The package root re-exports everything and imports nothing that imports it back at run time.
    graph = {name: _runtime_imports(name) - {"reftlib"} for name in MODULES}
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("name", ["reftlib.checks", "reftlib.merge", "reftlib.io", "reftlib.adapter_state",
                                  "reftlib.folders", "reftlib.hub", "reftlib.pyreft_format", "reftlib.config"])
def test_layers_below_the_model_do_not_import_it(name):
    assert "reftlib.model" not in _runtime_imports(name)
    assert "reftlib.interop" not in _runtime_imports(name)


def test_pyreft_format_does_not_import_io():
    assert not {"reftlib.io", "reftlib.folders", "reftlib.hub"} & _runtime_imports("reftlib.pyreft_format")


@pytest.mark.parametrize("name", ["reftlib.io", "reftlib.adapter_state", "reftlib.folders", "reftlib.hub",
                                  "reftlib.interop", "reftlib.pyreft_format", "reftlib.checks"])
def test_split_modules_stay_short(name):
    assert len(MODULES[name].read_text().splitlines()) <= 500


def test_checks_recognize_the_registered_reft_model_class():
    from tiny_models import tiny_model

    from reftlib.checks import register_reft_model_class, registered_reft_model_class, require_reft_model
    from reftlib.errors import ArgumentTypeError

    assert registered_reft_model_class() is reftlib.ReftModel
    reft_model = reftlib.ReftModel(tiny_model("llama"))
    assert require_reft_model(reft_model, "reft_model", "f") is reft_model
    with pytest.raises(ArgumentTypeError, match="expects a class"):
        register_reft_model_class("ReftModel")


def test_old_import_paths_keep_working():
    import reftlib.adapter_state
    import reftlib.config
    import reftlib.folders
    import reftlib.hub
    import reftlib.interop
    import reftlib.io
    import reftlib.model
    import reftlib.pyreft_format

    assert reftlib.model.DEFAULT_ADAPTER == reftlib.config.DEFAULT_ADAPTER == "default"
    assert reftlib.interop.read_pyreft_folder is reftlib.pyreft_format.read_pyreft_folder
    assert reftlib.interop.is_pyreft_folder is reftlib.io.is_pyreft_folder is reftlib.pyreft_format.is_pyreft_folder
    assert reftlib.io.PYREFT_CONFIG_NAME == reftlib.pyreft_format.PYREFT_CONFIG_NAME == "config.json"
    assert reftlib.io.read_adapter is reftlib.folders.read_adapter
    assert reftlib.io.get_adapter_state_dict is reftlib.adapter_state.get_adapter_state_dict
    assert reftlib.io.push_to_hub is reftlib.hub.push_to_hub
    for name in reftlib.io.__all__:
        assert hasattr(reftlib.io, name), name
