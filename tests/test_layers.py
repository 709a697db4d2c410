"""The core is built in floors, and no module imports from a floor above its own.

A lower floor never needs a higher one: the compiler does not import the runtime, the runtime not
the ranking, the SDK facade (``hal.plugin``) and the in-tree CPU plugin stand on everything, and
the command line on top. Imports inside functions and under ``TYPE_CHECKING`` count too: a lazy
import that runs upwards is still a cycle waiting to happen. A new module must be given a floor
here, or this test fails naming it.
"""

from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

import pytest

HAL = Path(__file__).resolve().parents[1] / "hal"

#: Lowest first. Modules on one floor may import each other.
FLOORS: tuple[tuple[str, ...], ...] = (
    ("hal.errors", "hal._paths", "hal._bounds"),
    ("hal.capabilities", "hal.cache"),
    ("hal.tensors", "hal.model", "hal.weights", "hal.fp8"),
    ("hal.lowering",),
    ("hal.backend", "hal.hookspecs", "hal.verification", "hal.health"),
    ("hal.compiler", "hal.compiler.*", "hal.backends", "hal.backends.onnxruntime", "hal.executable", "hal.estimate"),
    ("hal._plugins", "hal.ranking", "hal.isolation", "hal.pool"),
    ("hal.compiled", "hal.selection"),
    ("hal", "hal.plugin", "hal.backends.cpu", "hal._scaffold", "hal.testing", "hal.testing.*", "hal.bench",
     "hal.quantize", "hal.quantize.*", "hal.doctor", "hal.ray", "hal.ray.*"),
    ("hal.cli", "hal.__main__"),
)


def _floor(module: str) -> int:
    for level, patterns in enumerate(FLOORS):
        if any(fnmatch.fnmatchcase(module, p) for p in patterns):
            return level
    raise KeyError(module)


def _module(path: Path) -> str:
    parts = list(path.relative_to(HAL.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, int]]:
    """Every ``hal`` module ``path`` imports, anywhere in the file, with its line."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module != "hal":
                found.append((node.module, node.lineno))
                continue
            for alias in node.names:  # from hal import x: a submodule, or a name of the package
                if alias.name == "__version__":
                    continue  # a constant, set before the package imports anything
                is_module = (HAL / alias.name).is_dir() or (HAL / f"{alias.name}.py").is_file()
                found.append((f"hal.{alias.name}" if is_module else "hal", node.lineno))
    return [(m, line) for m, line in found if m == "hal" or m.startswith("hal.")]


MODULES = sorted(HAL.rglob("*.py"))


def test_every_module_has_a_floor() -> None:
    missing = []
    for path in MODULES:
        try:
            _floor(_module(path))
        except KeyError:
            missing.append(_module(path))
    assert not missing, f"give these modules a floor in FLOORS: {missing}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: _module(p))
def test_no_import_runs_upwards(path: Path) -> None:
    module = _module(path)
    level = _floor(module)
    upward = [
        f"line {line}: {target} (floor {_floor(target)})"
        for target, line in _imports(path)
        if _floor(target) > level
    ]
    assert not upward, f"{module} (floor {level}) imports from above: {upward}"


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    """The walker finds imports inside functions, the way the rule is most easily broken."""
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from hal.compiled import CompiledModel\n    from hal import cli\n")
    assert _imports(source) == [("hal.compiled", 2), ("hal.cli", 3)]
    assert _floor("hal.compiled") > _floor("hal.lowering")
