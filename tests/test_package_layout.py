"""The package's floors: a module imports only from its own floor or the ones below (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import diffinject

PACKAGE = Path(diffinject.__file__).parent
#: lower number = lower floor; a module may import its own floor and every lower one
FLOORS = {
    "logs": 0,
    "data": 1,
    "nets": 2,
    "diffusion": 2,
    "measures": 3,
    "convert": 3,
    "stages": 4,
    "callbacks": 5,
    "cli": 6,
    "__main__": 6,
    "report": 7,
    "workflow": 8,
}
TOP_LEVEL_MODULES = {"__init__", "__main__", "cli", "logs"}


def _part(module: str) -> str | None:
    """The package's first-level part a dotted `diffinject.…` name lies in."""
    parts = module.split(".")
    return parts[1] if parts[0] == "diffinject" and len(parts) > 1 else None


def imports_of(path: Path) -> set[str]:
    """The first-level parts of diffinject that a file imports (any depth, lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "diffinject":
                found.update(alias.name for alias in node.names)
            elif (part := _part(node.module)) is not None:
                found.add(part)
        elif isinstance(node, ast.Import):
            found.update(p for alias in node.names if (p := _part(alias.name)) is not None)
    return found


def test_every_import_goes_to_the_same_floor_or_lower() -> None:
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        part = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        if part == "__init__":
            continue
        assert part in FLOORS, f"{path}: {part!r} has no floor in this test (and in docs/architecture.md)"
        upward += [
            f"{path.relative_to(PACKAGE)} imports diffinject.{target}"
            for target in sorted(imports_of(path))
            if FLOORS.get(target, -1) > FLOORS[part]
        ]
    assert not upward, "imports against the floors:\n" + "\n".join(upward)


def test_the_top_floor_holds_no_loose_modules() -> None:
    loose = {p.stem for p in PACKAGE.glob("*.py")} - TOP_LEVEL_MODULES
    assert not loose, f"modules outside a package: {sorted(loose)}"


def test_the_checker_sees_an_upward_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from diffinject.workflow.pipeline import main\n")
    assert imports_of(module) == {"workflow"}
