"""The ``pipeline`` command: a thin shell over one ``run(cfg)`` per command."""
from __future__ import annotations

import click

from common.cli_support import ConfigSource


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="TOML config (default: the pipeline.toml shipped with the package).")
@click.option("--set", "assignments", multiple=True, metavar="TABLE.KEY=VALUE",
              help="Override any config key, e.g. --set optim.lr=0.1 (repeatable).")
@click.pass_context
def main(ctx: click.Context, config_path: str | None, assignments: tuple[str, ...]) -> None:
    """MEAL V2 distillation: cache an ensemble's soft labels once, train students from the cache."""
    ctx.obj = ConfigSource(config_path, assignments)


def _register() -> None:
    from data_manifests.cli import fashion_mnist_command, manifest_group
    from stage1_teacher_cache.cli import cache_group, teacher_cache_command
    from stage2_student_distill.cli import distill_command, evaluate_command, train_command
    from stage2_student_distill.use_cli import export_command, predict_command

    for cmd in (manifest_group, fashion_mnist_command, teacher_cache_command, cache_group,
                distill_command, train_command, evaluate_command, predict_command, export_command):
        main.add_command(cmd)
    try:
        from common.demo import demo_command
    except ImportError:
        return
    main.add_command(demo_command)


_register()


if __name__ == "__main__":
    main()
