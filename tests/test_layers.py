"""The import graph: the foundation imports nothing above it, and no module imports itself back.

Layers, from the bottom (DESIGN.md "Layout"; docs/design-notes.md has the map):
  0 common/                      config, crops, cache format, manifests, models, rendering, runtime
  1 data_manifests/, stage1_teacher_cache/   (neither imports the other)
  2 stage2_student_distill/      (it uses stage 1 for online targets and the experiment driver)
  3 stage2_student_distill/app/  the application: the `pipeline` command, demo, web pages
A module may import its own package and any lower layer. Every ``import`` counts, also those
inside functions (a lazy import is still a dependency). Read with ``ast``: nothing is imported.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "data_manifests", "stage1_teacher_cache", "stage2_student_distill")
LAYERS = {"common": 0, "data_manifests": 1, "stage1_teacher_cache": 1, "stage2_student_distill": 2,
          "stage2_student_distill.app": 3}


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules ``path`` imports (``from a import b`` counts as a.b when that is a module)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module
                     for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:  # a.b.c -> the longest prefix that is a project module
                name = name.rpartition(".")[0]
            if name:
                out.add(name)
    return out


def layer(module: str) -> tuple[int, str]:
    """(layer, the package that holds it) of the deepest LAYERS entry that contains ``module``."""
    owner = max((key for key in LAYERS if module == key or module.startswith(key + ".")), key=len)
    return LAYERS[owner], owner


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, known) - {name} for name, path in known.items()}


def upward(edges: dict[str, set[str]]) -> list[str]:
    wrong = []
    for module, targets in edges.items():
        level, owner = layer(module)
        for target in targets:
            their_level, their_owner = layer(target)
            if their_owner != owner and their_level >= level:
                wrong.append(f"{module} (layer {level}) imports {target} (layer {their_level})")
    return sorted(wrong)


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_a_layer_above_it_or_a_sibling_package():
    assert not upward(graph()), "\n".join(upward(graph()))


def test_no_import_circles():
    assert not circles(graph())


def test_the_checks_find_a_planted_upward_import_and_a_planted_circle():
    edges = graph()
    assert "stage2_student_distill.train" in edges["stage2_student_distill.experiment"]  # the graph is read
    planted = {**edges, "common.config": edges["common.config"] | {"stage1_teacher_cache.run"},
               "stage1_teacher_cache.views": edges["stage1_teacher_cache.views"] | {"data_manifests.build"},
               "stage2_student_distill.losses": edges["stage2_student_distill.losses"] | {"stage2_student_distill.app.cli"}}
    assert upward(planted) == [
        "common.config (layer 0) imports stage1_teacher_cache.run (layer 1)",
        "stage1_teacher_cache.views (layer 1) imports data_manifests.build (layer 1)",
        "stage2_student_distill.losses (layer 2) imports stage2_student_distill.app.cli (layer 3)",
    ]
    looped = {**edges, "common.atomic": edges["common.atomic"] | {"common.config"},
              "common.config": edges["common.config"] | {"common.atomic"}}
    assert ["common.atomic", "common.config"] in circles(looped)
