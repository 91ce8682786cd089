"""The one error type a user sees, and how its message survives worker boundaries.

Every expected failure of this project (bad config, manifest, image, cache,
weights, run directory, ...) is a :class:`PipelineError`; the CLI
(``common.cli_support.user_errors``) prints its message on one line and exits
1, without a traceback. Anything else is a bug and keeps its traceback.

Work done on other threads keeps the exception object (our prefetch loops and
thread pools re-raise it as is). A ``torch.utils.data.DataLoader`` worker
process does not: it re-raises ``type(e)(text)`` where ``text`` is "Caught X in
DataLoader worker process N" plus the worker's whole formatted traceback, or
a plain ``RuntimeError(text)`` when the type cannot be rebuilt from one string
(``ImageError(path, reason)``). :func:`user_message` recovers the original
message from either, and :func:`wrapped_user_error` recognises the second.
"""
from __future__ import annotations

import re

# The names of PipelineError and its subclasses (each added as it is defined), so that a RuntimeError
# carrying a worker's "Caught ImageError ..." text can be recognised as one of ours without importing anything.
_NAMES: set[str] = {"PipelineError"}

_WORKER_HEADER = re.compile(r"\ACaught (\w+) in (?:DataLoader worker process \d+|pin memory thread[^\n]*)\.\n")


class PipelineError(ValueError):
    """Bad input, config or state that the user can fix; the message says what and how.

    A ValueError, so code that predates this type (``except ValueError``) still catches it.
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _NAMES.add(cls.__name__)


class ConfigError(PipelineError):
    """A configuration value is unknown, of the wrong type or out of range (here, not in common/config.py,
    so that the modules config.py reads, such as common/recipes.py, can raise it without importing config)."""


class CacheError(PipelineError):
    """The cache is missing, incomplete, damaged or does not match its inputs (here, not with the cache's
    code, so that readers of a cache's records, such as stage 1's teacher_eval, raise it without torch)."""


def wrapped_user_error(e: BaseException) -> bool:
    """Whether ``e`` is a DataLoader worker's re-raise of one of our errors under another type."""
    header = _WORKER_HEADER.match(str(e))
    return bool(header) and header.group(1) in _NAMES


def user_message(e: BaseException) -> str:
    """The message to print for ``e``: its own text, or the original text of a worker's error."""
    text = str(e)
    if header := _WORKER_HEADER.match(text):
        # The formatted traceback ends with "module.Type: message" (after any chained causes).
        name = re.escape(header.group(1))
        ends = list(re.finditer(rf"^(?:[\w.]+\.)?{name}: ", text, re.M))
        if ends:
            text = text[ends[-1].end():]
    return text.strip()


def cause_text(e: BaseException, limit: int = 200) -> str:
    """``"Type: first line of the message"``, for naming a cause inside a one-line message."""
    lines = str(e).strip().splitlines()
    first = lines[0][:limit] if lines else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def shown(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters: a hostile value must not flood a one-line message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
