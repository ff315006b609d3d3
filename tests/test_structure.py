"""How the package is put together: every training flag says whether a resume must keep it, the imports run one
way (no cycle), and no module leans on more than five of its siblings."""

from __future__ import annotations

import ast
import dataclasses
import importlib
from pathlib import Path

from lenet_dist.config import TRAJECTORY_FIELDS, TrainConfig

PACKAGE = Path(__file__).resolve().parents[1] / "lenet_dist"
MOST_SIBLINGS = 5
# train.py is where the parts meet (torchtitan's train.py does the same): it alone may import them all.
WIRING = {"lenet_dist.train"}


def test_every_training_flag_says_whether_a_resume_must_keep_it():
    """A flag that changes what a run computes, left unclassified, would let --resume quietly continue another run:
    each is declared trajectory=True (a resume refuses a checkpoint made with another value) or False."""
    unclassified = [field.name for field in dataclasses.fields(TrainConfig)
                    if not isinstance(field.metadata["trajectory"], bool)]
    assert not unclassified, f"declare trajectory=True or False on: {', '.join(unclassified)}"


def test_a_resume_keeps_exactly_the_flags_declared_trajectory():
    declared = {field.name for field in dataclasses.fields(TrainConfig) if field.metadata["trajectory"]}
    assert set(TRAJECTORY_FIELDS) == declared == set(TrainConfig().trajectory())
    # what decides the weights is among them; how or where they are computed is not
    assert {"seed", "lr", "batch_size", "epochs", "optimizer", "dataset", "augment"} <= declared
    assert not {"output_dir", "resume", "workers", "compile", "mixed_precision", "profile"} & declared


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imported(name: str, *, module_level: bool) -> set[str]:
    """The package's modules that `name` imports (at its top only, or anywhere), each import of a.b.c also
    importing the packages a and a.b it lies in."""
    tree = ast.parse(MODULES[name].read_text())
    nodes = tree.body if module_level else ast.walk(tree)
    found = set()
    for node in nodes:
        assert not (isinstance(node, ast.ImportFrom) and node.level), f"{name}: a relative import (the package spells "\
            "its imports in full, which this test reads)"
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lenet_dist"):
            found |= {f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in MODULES else node.module
                      for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("lenet_dist")}
    with_packages = {".".join(target.split(".")[:end]) for target in found for end in range(2, target.count(".") + 2)}
    return (found | with_packages) - {name, "lenet_dist"}


def top(name: str) -> str:
    """A module of the package, or the subpackage that holds it: `lenet_dist.recipe.build` → `lenet_dist.recipe`."""
    return ".".join(name.split(".")[:2])


def test_no_import_cycle():
    """Counting the imports inside functions too (some wait there to keep --help quick), between modules and between
    the package's parts (a subpackage as one): the arrows run one way. And every module imports."""
    assert import_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    graph = {name: imported(name, module_level=False) & MODULES.keys() for name in MODULES}
    assert "lenet_dist.profiling.gpu" in graph["lenet_dist.profiling.host"]  # the graph sees imports at all
    parts: dict[str, set[str]] = {}
    for name, targets in graph.items():
        parts.setdefault(top(name), set()).update(top(target) for target in targets if top(target) != top(name))
    for found in (graph, parts):
        cycle = import_cycle(found)
        assert cycle is None, "import cycle: " + " → ".join(cycle)
    for name in sorted(set(MODULES) - {"lenet_dist.__main__"}):  # __main__ runs the command
        importlib.import_module(name)


def import_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A circle of imports (`a → b → a`), found depth first; None when there is none."""
    path: list[str] = []
    finished: set[str] = set()

    def visit(name: str) -> list[str] | None:
        if name in path:
            return [*path[path.index(name):], name]
        if name in finished:
            return None
        path.append(name)
        for target in sorted(graph[name]):
            if cycle := visit(target):
                return cycle
        path.pop()
        finished.add(name)
        return None

    return next(filter(None, map(visit, sorted(graph))), None)


def siblings(name: str) -> set[str]:
    """The modules and subpackages of its own package that `name` imports at its top."""
    package = name.rsplit(".", 1)[0] if MODULES[name].name != "__init__.py" else name
    return {package + "." + target[len(package) + 1:].split(".")[0]
            for target in imported(name, module_level=True) if target.startswith(package + ".")} - {name}


def test_no_module_imports_more_than_five_of_its_siblings():
    crowded = {name: sorted(siblings(name)) for name in MODULES if name not in WIRING}
    crowded = {name: found for name, found in crowded.items() if len(found) > MOST_SIBLINGS}
    assert not crowded, f"more than {MOST_SIBLINGS} siblings imported: {crowded}"
