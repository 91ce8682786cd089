"""Recipes: named partial configs laid over pipeline.toml (``pipeline --recipe NAME COMMAND``).

A recipe is ``recipes/NAME.toml``: a few tables of pipeline.toml with the
values of one published training run. Its leading comment block documents
the run; the first line is ``# NAME: summary``, which ``pipeline recipes``
lists. ``--recipe`` also takes a path to a recipe file of one's own; how it
is laid over the rest is common/config.py ``load_config``.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

from common.errors import ConfigError

# recipes/ at the top level is where they are edited; common/recipe_files links to it, so they
# ship in the wheel as package data of `common` (like pipeline.toml) without a top-level
# package named `recipes` in site-packages (docs/design-notes.md).
RECIPES_DIR = Path(__file__).resolve().parent / "recipe_files"


@dataclass(frozen=True)
class Recipe:
    name: str
    path: Path
    summary: str  # the first header line, after "NAME:"
    header: str  # the whole leading comment block, "# " removed


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))


def recipe_path(name_or_path: str) -> Path:
    """``NAME`` -> recipes/NAME.toml; a value ending in .toml is a path to a recipe file."""
    if name_or_path.endswith(".toml"):
        path = Path(name_or_path)
        if not path.is_file():
            raise ConfigError(f"recipe file {path} does not exist; give an existing file or a recipe name")
        return path
    path = RECIPES_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        raise ConfigError(
            f"unknown recipe {name_or_path!r}; `pipeline recipes` lists them: {', '.join(recipe_names())}"
        )
    return path


def read_recipe(name_or_path: str) -> Recipe:
    path = recipe_path(name_or_path)
    comments = itertools.takewhile(lambda line: line.startswith("#"), path.read_text().splitlines())
    header = [line[2:] if line.startswith("# ") else line[1:] for line in comments]
    first = header[0] if header else ""
    name, sep, summary = first.partition(":")
    if not sep or name.strip() != path.stem:
        raise ConfigError(f"{path}: the first line must be '# {path.stem}: one-line summary'")
    return Recipe(name=path.stem, path=path, summary=summary.strip(), header="\n".join(header))


def list_recipes() -> list[Recipe]:
    return [read_recipe(name) for name in recipe_names()]
