"""The ``pipeline`` command: a thin shell over one ``run(cfg)`` per command."""
from __future__ import annotations

import click

from common.cli_support import ConfigSource
from common.errors import cause_text


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="TOML config (default: the pipeline.toml shipped with the package).")
@click.option("--recipe", metavar="NAME|FILE.toml",
              help="Lay a recipe over the config (`pipeline recipes` lists them); --set and flags still win.")
@click.option("--set", "assignments", multiple=True, metavar="TABLE.KEY=VALUE",
              help="Override any config key, e.g. --set optim.lr=0.1 (repeatable).")
@click.pass_context
def main(ctx: click.Context, config_path: str | None, recipe: str | None, assignments: tuple[str, ...]) -> None:
    """MEAL V2 distillation: cache an ensemble's soft labels once, train students from the cache."""
    ctx.obj = ConfigSource(config_path, assignments, recipe)


def _register() -> None:
    from stage2_student_distill.app.recipes_cli import config_group, recipes_command
    from stage2_student_distill.app.serve.cli import serve_command
    from data_manifests.cli import fashion_mnist_command, manifest_group
    from stage1_teacher_cache.cli import cache_group, teacher_cache_command
    from stage2_student_distill.cli import distill_command, evaluate_command, train_command
    from stage2_student_distill.use_cli import export_command, predict_command

    for cmd in (manifest_group, fashion_mnist_command, teacher_cache_command, cache_group,
                distill_command, train_command, evaluate_command, predict_command, export_command,
                recipes_command, config_group, serve_command):
        main.add_command(cmd)
    try:
        from stage2_student_distill.app.demo import demo_command
    except ImportError as e:  # an optional dependency is missing: say so when the command is run
        demo_command = _unavailable("demo", e)
    main.add_command(demo_command)


def _unavailable(name: str, error: ImportError) -> click.Command:
    """A stand-in for a command whose module does not import: listed, and explains itself when run."""
    why = f"{cause_text(error)}; install the missing module ({error.name or 'see the message'}) to use it"

    @click.command(name, help=f"(unavailable here: {why})", add_help_option=False,
                   context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
    def command() -> None:
        raise click.ClickException(f"`pipeline {name}` cannot run here: {why}")

    return command


_register()


if __name__ == "__main__":
    main()
