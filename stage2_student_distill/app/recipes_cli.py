"""`pipeline recipes` and `pipeline config show`: what a recipe is, and exactly what a command would run."""
from __future__ import annotations

import dataclasses

import click

from common.cli_support import ConfigShown, ConfigSource, resolve_config, user_errors

# The commands that resolve the config before doing any work; any other would
# simply run, so `config show` refuses it.
CONFIG_COMMANDS = ("teacher-cache", "distill", "train", "evaluate", "predict", "demo")


@click.command("recipes")
@click.option("--show", "name", metavar="NAME", help="Print one recipe's header (commands, hardware, expected result).")
def recipes_command(name: str | None) -> None:
    """List the recipes, one line each (use one with `pipeline --recipe NAME COMMAND ...`)."""
    from common.recipes import list_recipes, read_recipe

    with user_errors():
        if name:
            click.echo(read_recipe(name).header)
            return
        recipes = list_recipes()
    width = max((len(r.name) for r in recipes), default=0)
    for r in recipes:
        click.echo(f"{r.name:<{width}}  {r.summary}")


@click.group("config")
def config_group() -> None:
    """Inspect the resolved configuration."""


@config_group.command(
    "show", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
)
@click.option("--recipe", metavar="NAME|FILE.toml", help="Lay this recipe over the config (as `pipeline --recipe`).")
@click.argument("command", nargs=-1, type=click.UNPROCESSED, metavar="[COMMAND [FLAGS...]]")
@click.pass_context
def show_command(ctx: click.Context, recipe: str | None, command: tuple[str, ...]) -> None:
    """Print the resolved config as TOML: exactly what COMMAND with FLAGS would run (nothing runs).

    Without COMMAND: pipeline.toml (or --config) <- --recipe <- --set. With
    it, e.g. `pipeline config show --recipe mealv2_resnet50_224 distill --epochs 3`,
    the command's own flags are resolved by the command itself. The output
    is a complete config file: `pipeline --config OUT.toml ...` runs the same.
    """
    root = ctx.find_root()
    source: ConfigSource = root.obj or ConfigSource(None, ())
    root.obj = dataclasses.replace(source, recipe=recipe or source.recipe, show_only=True)
    try:
        if not command:
            resolve_config(ctx)  # prints, then raises ConfigShown
        name, *flags = command
        target = root.command.get_command(root, name) if isinstance(root.command, click.Group) else None
        if target is None or name not in CONFIG_COMMANDS:
            raise click.UsageError(f"`config show` takes one of {', '.join(CONFIG_COMMANDS)}, not {name!r}")
        with target.make_context(name, list(flags), parent=ctx) as sub:
            target.invoke(sub)
    except ConfigShown:
        return
    raise AssertionError(f"`pipeline {name}` returned without resolving its config")  # pragma: no cover
