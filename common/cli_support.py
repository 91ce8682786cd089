"""Plumbing shared by the command modules: config resolution and error reporting.

Commands stay thin: resolve the config (file <- --set <- flags), call one
``run(cfg)``, and turn expected errors into a one-line message with exit 1.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import click

from common.config import Config, config_to_toml, load_config
from common.errors import PipelineError, user_message, wrapped_user_error


@dataclass(frozen=True)
class ConfigSource:
    path: str | None
    assignments: tuple[str, ...]
    recipe: str | None = None  # --recipe NAME (or a recipe file)
    show_only: bool = False  # `pipeline config show COMMAND ...`: print the resolved config, run nothing


class ConfigShown(Exception):
    """Raised by resolve_config in show-only mode, after printing, so the command stops there."""


def config_options(options: dict[str, tuple[str, dict]]):
    """The one way a command maps flags to config keys: ``{"--flag": ("table.key", click settings)}``.

    Each option is attached under the parameter name ``table__key`` (its help ends with ``[table.key]``),
    so the command hands those parameters to ``resolve_config`` as they come.
    """

    def decorate(command):
        for flag, (key, settings) in reversed(options.items()):
            help_text = f"{settings.get('help', '')} [{key}]".lstrip()
            command = click.option(flag, key.replace(".", "__"), **{**settings, "help": help_text})(command)
        return command

    return decorate


def resolve_config(ctx: click.Context, flags: dict[str, object] | None = None, layers: tuple[Path, ...] = ()) -> Config:
    """pipeline.toml (or --config) <- ``layers`` (the command's own partial configs) <- --recipe <- --set
    TABLE.KEY=VALUE <- command flags: the parameters of ``config_options`` by their names ``table__key``
    (None or () = not given)."""
    src: ConfigSource = ctx.find_root().obj or ConfigSource(None, ())
    overrides: dict[str, object] = {}
    for item in src.assignments:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.UsageError(f"--set {item!r}: expected TABLE.KEY=VALUE")
        overrides[key.strip()] = value.strip()
    overrides.update({name.replace("__", "."): v for name, v in (flags or {}).items() if v is not None and v != ()})
    with user_errors():
        cfg = load_config(src.path, overrides, recipe=src.recipe, layers=layers)
    if src.show_only:
        click.echo(config_to_toml(cfg), nl=False)
        raise ConfigShown
    return cfg


@contextlib.contextmanager
def user_errors():
    """Expected failures (bad input, bad config) -> message + exit 1, no traceback.

    Every error type of this project is a ``common.errors.PipelineError``
    (ConfigError, ManifestError, CacheError, WeightsError, ImageError, ...),
    also when a DataLoader worker re-raised it under another type; OSErrors
    (missing file, permission, disk full) are the user's to fix too. A
    ValueError from a library refusing its input is printed with its type.
    Anything else is a bug and keeps its traceback.
    """
    try:
        yield
    except (PipelineError, OSError) as e:
        raise click.ClickException(user_message(e)) from None
    except ValueError as e:
        raise click.ClickException(f"{type(e).__name__}: {user_message(e)}") from None
    except RuntimeError as e:
        if wrapped_user_error(e):
            raise click.ClickException(user_message(e)) from None
        raise
    except KeyboardInterrupt:
        raise click.ClickException("interrupted; rerun the same command to resume") from None
