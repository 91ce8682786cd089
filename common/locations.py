"""Where a cache, manifest or pack lives: a local path, a ``file://`` URL or any other fsspec URL.

The one place that tells them apart, so every reader and writer agrees. A plain
path and a ``file://`` URL are the local filesystem, used directly (atomic temp +
rename writes, no fsspec). Anything else (``s3://``, ``gs://``, ``memory://``...)
goes through fsspec, whose backends (s3fs, gcsfs) find endpoints and credentials
the way their SDKs do: docs/object-stores.md says what a team sets.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

from common.atomic import atomic_write_bytes

# The extra that brings each backend fsspec names in its ImportError.
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}


class LocationError(ValueError):
    """A location cannot be used: its fsspec backend is not installed, or it is a URL where only a
    local path will do."""


def scheme(location: str | os.PathLike) -> str:
    """``"s3"`` for ``s3://b/k``, ``"file"`` for a file URL, ``""`` for a plain path."""
    head, sep, _ = str(location).partition("://")
    return head.lower() if sep else ""


def is_url(location: str | os.PathLike) -> bool:
    return bool(scheme(location))


def local_path(location: str | os.PathLike) -> Path | None:
    """The local path of a plain path or ``file://`` URL; None for any other URL."""
    text = str(location)
    kind = scheme(text)
    if kind == "file":
        return Path(url2pathname(urlparse(text).path))
    return None if kind else Path(text)


def require_local(location: str | os.PathLike, what: str) -> Path:
    """The local path of ``location``; a URL is refused naming ``what`` must be local (a URL would
    otherwise become a local folder named ``s3:``)."""
    path = local_path(location)
    if path is None:
        raise LocationError(f"{location}: {what} must be a local path (or a mounted filesystem), not a URL; "
                            "write it locally and copy it to the object store afterwards (docs/object-stores.md)")
    return path


def absolute(location: str | os.PathLike) -> str:
    """A location as recorded in metadata: URLs as given, local paths made absolute."""
    return str(location) if is_url(location) else str(Path(location).absolute())


def filesystem(location: str | os.PathLike) -> tuple[Any, str]:
    """``(fsspec filesystem, path inside it)`` of a remote URL; a missing backend is a one-line error."""
    import fsspec  # only remote locations need it

    try:
        return fsspec.core.url_to_fs(str(location))
    except ImportError as e:
        extra = _EXTRAS.get(scheme(location))
        remedy = f"pip install 'mealv2-pipeline[{extra}]'" if extra else "install the fsspec backend it names"
        raise LocationError(f"{location}: cannot open {scheme(location)}:// URLs ({e}); {remedy}") from e


def read_bytes(location: str | os.PathLike) -> bytes:
    """The whole file; FileNotFoundError when it is absent, local or remote."""
    path = local_path(location)
    if path is not None:
        return path.read_bytes()
    fs, inner = filesystem(location)
    return fs.cat_file(inner)


def write_bytes(location: str | os.PathLike, data: bytes) -> None:
    """Write a whole file so that no reader sees half of it: temp + rename locally; one PUT on an
    object store (an object appears only when its upload completes)."""
    path = local_path(location)
    if path is not None:
        atomic_write_bytes(path, data)
        return
    fs, inner = filesystem(location)
    fs.pipe_file(inner, data)


def remove(location: str | os.PathLike) -> None:
    """Delete a file if it exists."""
    path = local_path(location)
    if path is not None:
        path.unlink(missing_ok=True)
        return
    fs, inner = filesystem(location)
    if fs.exists(inner):
        fs.rm_file(inner)


def file_sizes(location: str | os.PathLike) -> dict[str, int]:
    """``{relative POSIX name: size}`` of every object under a remote folder, sorted by name (a local
    folder is listed by common.cache_format.cache_files, which refuses links and special files)."""
    fs, inner = filesystem(location)
    root = inner.rstrip("/")
    fs.invalidate_cache(root)  # a listing cached earlier in this process may predate writes since
    found = fs.find(root, detail=True)
    return {name[len(root) + 1:]: int(info["size"]) for name, info in sorted(found.items())
            if info.get("type") != "directory" and name.startswith(root + "/")}


def open_read(location: str | os.PathLike):
    """A binary file object to read, on a local path or a URL (streamed, not read whole)."""
    path = local_path(location)
    if path is not None:
        return open(path, "rb")
    fs, inner = filesystem(location)
    return fs.open(inner, "rb")
