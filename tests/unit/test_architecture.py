"""The layout is the architecture: which package may import which, and no import circles anywhere.

Imports are read from the source (every `import` and `from ... import`, inside functions too), so a lazy
import cannot hide an edge. A package's implicit import of its parent `__init__` is not counted: that is how
Python runs packages, not a dependency anyone wrote.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("pipeline", "kd", "formats", "stages", "launch", "bench", "publish")
ALLOWED = {
    "pipeline": {"pipeline"},
    "kd": {"pipeline", "kd"},
    "formats": {"pipeline", "kd", "formats"},
    "stages": {"pipeline", "kd", "formats", "stages"},
    "launch": {"pipeline", "launch"},
    "bench": {"pipeline", "kd", "formats", "stages", "bench"},
    "publish": {"pipeline", "kd", "formats", "publish"},
}
"""Top-level package -> the project packages its modules may import."""


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[module_name(path)] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules that module `name` imports (`from a import b` counts a.b when that is a module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                full = f"{module}.{alias.name}"
                targets.add(full if full in known else module)
    return {t for t in targets if t in known and t != name}


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(name, path, set(modules)) for name, path in modules.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path a -> ... -> a, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_circle():
    cycle = find_cycle(graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_find_cycle_sees_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_packages_import_only_what_the_layout_allows():
    wrong = [f"{src} imports {dst}" for src, targets in graph().items() for dst in targets
             if dst.split(".")[0] not in ALLOWED[src.split(".")[0]]]
    assert not wrong, "\n".join(wrong)


def test_no_stage_imports_another_stage():
    def stage_of(module: str) -> str | None:
        parts = module.split(".")
        return parts[1] if parts[0] == "stages" and len(parts) > 1 else None

    wrong = [f"{src} imports {dst}" for src, targets in graph().items() for dst in targets
             if stage_of(src) and stage_of(dst) and stage_of(src) != stage_of(dst)]
    assert not wrong, "\n".join(wrong)


def test_relative_and_lazy_imports_are_seen(tmp_path):
    pkg = tmp_path / "p"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from . import b\n    from p.c import thing\n")
    known = {"p", "p.a", "p.b", "p.c"}
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        assert imports_of("p.a", pkg / "a.py", known) == {"p.b", "p.c"}
    finally:
        ROOT = saved


@pytest.mark.parametrize("stage", sorted(p.name for p in (ROOT / "stages").iterdir() if (p / "__init__.py").is_file()))
def test_every_stage_is_a_package_with_its_config_module(stage):
    from pipeline import registry

    folder = ROOT / "stages" / stage
    assert (folder / "config.py").is_file(), f"stages/{stage}/config.py holds the stage's Config"
    module = __import__(f"stages.{stage}", fromlist=["Config", "run"])
    assert module.Config.__module__ == f"stages.{stage}.config"
    assert callable(module.run)
    assert f"stages.{stage}" in registry.STAGES.values()


def test_stages_folder_holds_only_stage_packages():
    loose = [p.name for p in (ROOT / "stages").glob("*.py") if p.name != "__init__.py"]
    assert not loose, f"stages/ holds stage packages only; move {loose} into a stage, kd/ or formats/"


def names_imported(path: Path, known: set[str]) -> list[tuple[str, str]]:
    """(module, name) for every absolute `from <project module> import name` in `path`, lazy ones included."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return [(node.module, alias.name) for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and not node.level and node.module in known
            for alias in node.names if alias.name != "*"]


def test_every_imported_name_exists():
    """A lazy `from stages.x import f` names a function that a refactor moved away only fails when it runs
    (bench/ once imported a helper that had moved to kd/): every imported name must exist where it is asked."""
    import importlib

    modules = project_modules()
    missing = []
    for name, path in modules.items():
        for module, attr in names_imported(path, set(modules)):
            if f"{module}.{attr}" not in modules and not hasattr(importlib.import_module(module), attr):
                missing.append(f"{name} imports {attr} from {module}, which has no such name")
    assert not missing, "\n".join(missing)


def test_a_moved_name_is_seen(tmp_path):
    (tmp_path / "a.py").write_text("def f():\n    from pipeline.world import NoSuchThing\n")
    assert names_imported(tmp_path / "a.py", {"pipeline.world"}) == [("pipeline.world", "NoSuchThing")]
