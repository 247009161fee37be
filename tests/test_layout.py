"""The package layout: the library below, the drivers (ensdiv.runs) beside each other above it,
the command line on top — checked on the import graph of every module's import statements."""

import ast
import functools
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ensdiv"
MAX_FLOORS = 9


def _graph() -> dict[str, set[str]]:
    modules = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(
        ".__init__"): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):  # every import, not just the top
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")[:len(package.split(".")) - node.level + 1] \
                    if node.level else []
                mod = ".".join(base + ([node.module] if node.module else []))
                targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod
                           for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
    return graph


GRAPH = _graph()
# the driver side's shared modules, one job each: run folders, reading records, rendering tables
SHARED = {"ensdiv.runs.rundir", "ensdiv.runs.records", "ensdiv.runs.report"}
DRIVERS = {m for m in GRAPH if m.startswith("ensdiv.runs.")} - SHARED
TOP = {"ensdiv", "ensdiv.cli", "ensdiv.cli_options", "ensdiv.__main__", "ensdiv.runs"}
LIBRARY = set(GRAPH) - DRIVERS - TOP - SHARED
# modules of names only (the version, the vocabulary the command line parses with): they import
# nothing, so every module may use them without raising the building by a floor
GROUND = {"ensdiv._version", "ensdiv.vocab"}


@functools.cache
def floor(module: str, path: tuple[str, ...] = ()) -> int:
    if module in GROUND:
        return 0
    if module in path:
        pytest.fail(f"import cycle: {' -> '.join(path + (module,))}")
    return 1 + max((floor(d, path + (module,)) for d in GRAPH[module]), default=0)


def test_the_ground_modules_hold_names_only_and_import_nothing():
    for module in GROUND:
        tree = ast.parse((PACKAGE.parent / (module.replace(".", "/") + ".py")).read_text())
        imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
        assert all(isinstance(n, ast.ImportFrom) and n.module in ("__future__", "typing")
                   for n in imports), module
        assert not any(isinstance(n, (ast.FunctionDef, ast.ClassDef)) for n in tree.body), module


def test_no_cycles_and_at_most_nine_floors():
    floors = {m: floor(m) for m in GRAPH}
    assert max(floors.values()) <= MAX_FLOORS, sorted(floors.items(), key=lambda kv: kv[1])


def test_the_library_imports_no_driver_and_no_command_line():
    for module in LIBRARY:
        upward = GRAPH[module] - LIBRARY
        assert not upward, f"{module} imports {sorted(upward)}"


def test_drivers_stand_side_by_side():
    assert {"ensdiv.runs.train", "ensdiv.runs.sweep", "ensdiv.runs.detect"} <= DRIVERS
    for module in DRIVERS:
        others = GRAPH[module] & DRIVERS
        assert not others, f"the driver {module} imports the drivers {sorted(others)}"
    for module in SHARED:  # below every driver: the library and each other only
        assert GRAPH[module] <= LIBRARY | SHARED, f"{module} imports {sorted(GRAPH[module])}"


def test_io_does_not_pull_in_the_process_group():
    assert "ensdiv.distributed" not in GRAPH["ensdiv.io"]


def test_one_name_one_meaning():
    """No library module shares a driver's name (``ensdiv.train`` vs ``ensdiv.runs.train``), and
    no public function or class is defined twice in the package (two ``evaluate_run``)."""
    import ast
    import collections

    library = {m.rsplit(".", 1)[-1] for m in LIBRARY}
    drivers = {m.rsplit(".", 1)[-1] for m in DRIVERS | SHARED}
    assert not library & drivers
    where = collections.defaultdict(list)
    for path in PACKAGE.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                where[node.name].append(path.relative_to(PACKAGE).as_posix())
    assert not {k: v for k, v in where.items() if len(v) > 1}


def test_the_curated_api():
    import ensdiv

    for name in ensdiv.__all__:
        assert getattr(ensdiv, name) is not None and (name == "__version__"
                                                       or getattr(ensdiv, name).__doc__)
    # the headline functions of each capability are in the curated API
    assert {"robustness_card", "Card", "mora", "square", "whitebox_entry", "Smooth",
            "DisagreementDetector", "TrainConfig", "fit"} <= set(ensdiv.__all__)
    import ensdiv.gdr
    assert callable(ensdiv.gdr.gdr)  # no top-level name shadows a module
    # each name loads from the module that defines it, on first use; a module of the same
    # name would take its place once imported (the import system sets the package attribute)
    import pkgutil
    assert not set(ensdiv._HOMES) & {m.name for m in pkgutil.iter_modules(ensdiv.__path__)}
    assert set(ensdiv.__all__) == {"__version__", *ensdiv._HOMES}
    for name, home in ensdiv._HOMES.items():
        assert getattr(ensdiv, name) is getattr(importlib.import_module(f"ensdiv.{home}"),
                                                name), name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        ensdiv.nope  # noqa: B018
