"""The MEAL V2 recipes: one partial config (``NAME.toml``) per released model.

A package only so that the ``.toml`` files ship with a wheel (package data)
and are found next to this file in a checkout and in an install alike;
``common/recipes.py`` reads them.
"""
from pathlib import Path

RECIPES_DIR = Path(__file__).resolve().parent
