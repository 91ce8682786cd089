"""The image manifest: one Parquet file that pins down a dataset.

Both stages read images through a manifest, never by walking a directory, so
the teacher cache and the student run agree on which image ``image_id`` 17 is.
Layout (format ``meal-v2-manifest``, version 1), one row per image:

    image_id int64   dense 0..N-1, rows stored in this order
    path     string  relative POSIX path under the root (no ``..``, not absolute)
    label    int32   class index, -1 = unlabeled
    width    int32   after EXIF orientation
    height   int32   after EXIF orientation
    bytes    int64   file size
    sha256   string  hex digest of the file

Schema metadata (UTF-8 keys, every value JSON-encoded): ``meal.format``,
``meal.version``, ``meal.class_names``, ``meal.root`` (absolute root at build
time; overridable on load), ``meal.description``, ``meal.hash_algorithm``,
``meal.hash_scheme`` and ``meal.content_hash``.

The content hash covers (image_id, path, label, width, height, sha256) and the
class names, not the root, file sizes or description: it names the dataset,
wherever it lives. It is recomputed on every load, so a hand-edited manifest
is refused. Hash scheme 1 (manifests written before ``meal.hash_scheme``
existed, which therefore lack the key) left width and height out; such a
manifest is still verified with scheme 1 and keeps its hash, so the caches
built from it still match it, but its widths and heights are not protected:
rebuild it to protect them (which gives it a new hash, and so needs a new cache).

A manifest has at least one image, no path twice and no class name twice.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tqdm import tqdm

from common.errors import PipelineError, shown
from common.images import ImageError
from common.locations import is_url, read_bytes, write_bytes
from common.prefetch import prefetch

MANIFEST_FORMAT = "meal-v2-manifest"
MANIFEST_VERSION = 1
HASH_ALGORITHM = "sha256"
# Hash scheme written by this version (see the module docstring); a manifest without
# meal.hash_scheme uses 1.
HASH_SCHEME = 2
_LEGACY_HASH_SCHEME = 1
_LISTED_MISMATCHES = 5  # files named in a --check-images failure; the rest are counted

SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("path", pa.string()),
        ("label", pa.int32()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("bytes", pa.int64()),
        ("sha256", pa.string()),
    ]
)

# Vectorised form of check_relative_path (RE2 syntax), so loading 1M+ paths stays fast.
_UNSAFE_PATH_REGEX = r"^$|\x00|\\|^/|//|/$|(^|/)\.\.?(/|$)"
_BUILD_HINT = "build one with `pipeline manifest build ROOT --out M.parquet`"
_REBUILD_HINT = "rebuild it with `pipeline manifest build`"
_WRITABLE_HINT = "write it to a folder you can write to (not on a read-only filesystem)"


class ManifestError(PipelineError):
    """A manifest is missing, malformed or inconsistent; the message says how to fix it."""


class ManifestRow(NamedTuple):
    """One image as the builder found it; ``image_id`` is its position in the list."""

    path: str
    label: int
    width: int
    height: int
    bytes: int
    sha256: str


@dataclass(frozen=True, eq=False)
class Manifest:
    """A loaded, verified manifest. Arrays are indexed by ``image_id``."""

    path: Path
    root: Path
    class_names: tuple[str, ...]
    content_hash: str
    description: str
    image_ids: np.ndarray  # int64, == arange(N)
    paths: list[str]
    labels: np.ndarray  # int32, -1 = unlabeled
    widths: np.ndarray  # int32
    heights: np.ndarray  # int32
    file_bytes: np.ndarray  # int64
    hash_algorithm: str = HASH_ALGORITHM  # how the files were digested
    hash_scheme: int = HASH_SCHEME  # which encoding content_hash uses (module docstring)
    # Per-image hex digests: only with load_manifest(..., with_digests=True), as 1.28M of them
    # cost ~90 MB that a training run does not need.
    digests: pa.Array | None = None

    @property
    def num_images(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def abspath(self, image_id: int) -> Path:
        return self.root / self.paths[image_id]


class ConfinedPaths:
    """``manifest.abspath``, refusing a file reached through a symlink added after the build.

    The builder rejects every symlink, so a link met at read time was planted
    later (or the data moved): reading through it could leave the data root.
    Per file this costs one ``lstat``; each directory is resolved once and
    remembered, so stage 2 can afford it on every image of every epoch.
    Thread-safe (the memo is a dict written whole under the GIL).
    """

    def __init__(self, manifest: Manifest):
        self.manifest = manifest
        self.real_root = os.path.realpath(manifest.root)
        self._prefix = self.real_root.rstrip(os.sep) + os.sep
        self._dir_inside: dict[str, bool] = {}

    def _inside(self, real: str) -> bool:
        return real == self.real_root or real.startswith(self._prefix)

    def __call__(self, image_id: int) -> Path:
        path = self.manifest.abspath(int(image_id))
        folder = os.path.dirname(path)
        inside = self._dir_inside.get(folder)
        if inside is None:
            inside = self._dir_inside[folder] = self._inside(os.path.realpath(folder))
        if inside and not os.path.islink(path):
            return path
        resolved = os.path.realpath(path)
        if not self._inside(resolved):
            raise ImageError(path, f"resolves to {resolved}, outside the data root {self.real_root} (a symlink "
                                   "added after the manifest was built?); remove it or rebuild the manifest")
        raise ImageError(path, f"is a symbolic link to {resolved}, added after the manifest was built (the "
                               "builder accepts none); replace it with the file or rebuild the manifest")


def check_relative_path(path: str) -> str | None:
    """Why ``path`` is not a safe, canonical relative POSIX path, or None if it is.

    Canonical (no ``.``, empty or ``..`` parts) so one file has one spelling
    and the content hash cannot differ for the same dataset; relative so the
    root can move; no NUL because the hash separates paths with it.
    """
    if not path:
        return "empty path"
    if "\0" in path:
        return "contains a NUL character"
    if "\\" in path:
        return "contains a backslash (paths are POSIX, '/'-separated)"
    if path.startswith("/"):
        return "absolute path (paths are relative to the root)"
    parts = path.split("/")
    if ".." in parts:
        return "contains '..' (paths must stay under the root)"
    if any(part in ("", ".") for part in parts):
        return "not normalised (empty or '.' components)"
    return None


def content_hash(table: pa.Table) -> str:
    """Deterministic sha256 of the dataset's identity (see module docstring).

    Encoding: a JSON header (format, version, hash algorithm, class names, row
    count; scheme 2 adds ``hash_scheme``), then image_ids as little-endian
    int64, labels as little-endian int32, (scheme 2 only) widths then heights
    as little-endian int32, the paths joined by NUL and the 64-char hex
    digests concatenated; rows in image_id order. Fixed widths plus the row
    count make it unambiguous. The scheme is the table's ``meal.hash_scheme``
    (1 when absent).
    """
    class_names = _read_metadata(table.schema, "class_names", source="table")
    scheme = _hash_scheme(table.schema, source="table")
    order = np.argsort(table.column("image_id").to_numpy(), kind="stable")
    table = table.take(pa.array(order))
    return _hash_columns(
        class_names,
        table.column("image_id").to_numpy().astype("<i8"),
        table.column("label").to_numpy().astype("<i4"),
        table.column("path").to_pylist(),
        table.column("sha256"),
        table.column("width").to_numpy(),
        table.column("height").to_numpy(),
        scheme=scheme,
    )


_HASH_CHUNK = 65536  # rows per hash update: bounds the temporary strings at any dataset size


def _hash_columns(
    class_names: Sequence[str],
    image_ids: np.ndarray,
    labels: np.ndarray,
    paths: Sequence[str],
    digests: Sequence[str] | pa.ChunkedArray,
    widths: np.ndarray,
    heights: np.ndarray,
    scheme: int = HASH_SCHEME,
) -> str:
    """sha256 of the encoding in ``content_hash``, fed in chunks of rows.

    sha256 is streaming, so the digest equals hashing the whole joined strings
    at once; building those strings for 1.28M rows was the largest transient
    allocation of a distill run (~850 MB, docs/performance.md).
    """
    header = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "hash_algorithm": HASH_ALGORITHM,
        "class_names": list(class_names),
        "num_images": len(paths),
    }
    if scheme != _LEGACY_HASH_SCHEME:  # scheme 1's header is kept byte for byte, so old hashes still verify
        header["hash_scheme"] = scheme
    h = hashlib.sha256()
    h.update(json.dumps(header, sort_keys=True, ensure_ascii=False).encode("utf-8"))
    h.update(np.ascontiguousarray(image_ids, dtype="<i8").tobytes())
    h.update(np.ascontiguousarray(labels, dtype="<i4").tobytes())
    if scheme != _LEGACY_HASH_SCHEME:  # the frame stage 1 draws boxes in belongs to the dataset's identity
        h.update(np.ascontiguousarray(widths, dtype="<i4").tobytes())
        h.update(np.ascontiguousarray(heights, dtype="<i4").tobytes())
    for start in range(0, len(paths), _HASH_CHUNK):
        h.update(("\0" if start else "").encode() + "\0".join(paths[start : start + _HASH_CHUNK]).encode("utf-8"))
    for start in range(0, len(digests), _HASH_CHUNK):
        chunk = digests[start : start + _HASH_CHUNK]
        h.update("".join(chunk.to_pylist() if hasattr(chunk, "to_pylist") else chunk).encode("ascii"))
    return h.hexdigest()


def write_manifest(
    rows: Iterable[ManifestRow],
    class_names: Sequence[str],
    root: str | os.PathLike,
    out: str | os.PathLike,
    description: str = "",
) -> str:
    """Write ``rows`` (in image_id order) to ``out`` (a path or fsspec URL) atomically; return the
    content hash.

    Atomic (temp file + ``os.replace`` locally, one whole-object upload on an
    object store) so a crash never leaves a half-written manifest that a later
    stage would trust.
    """
    rows = list(rows)
    class_names = [str(c) for c in class_names]
    if not rows:
        raise ManifestError(f"no images to write to {out}: a manifest needs at least one image")
    if (duplicate_class := _first_duplicate(class_names)) is not None:
        raise ManifestError(f"class name {duplicate_class!r} appears twice: each class needs its own name")
    for i, row in enumerate(rows):
        if problem := check_relative_path(row.path):
            raise ManifestError(f"row {i}: path {row.path!r}: {problem}")
        if not -1 <= row.label < len(class_names):
            raise ManifestError(f"row {i} ({row.path}): label {row.label} outside -1..{len(class_names) - 1}")
    if duplicates := _first_duplicate([r.path for r in rows]):
        raise ManifestError(f"path {duplicates!r} appears twice: list each image once")
    # ManifestRow's fields are SCHEMA's columns after image_id
    columns = {"image_id": pa.array(np.arange(len(rows), dtype=np.int64)),
               **{f.name: pa.array([getattr(r, f.name) for r in rows], f.type) for f in SCHEMA if f.name != "image_id"}}
    table = pa.table(columns, schema=SCHEMA)
    digest = _hash_columns(
        class_names,
        columns["image_id"].to_numpy(),
        columns["label"].to_numpy(),
        [r.path for r in rows],
        [r.sha256 for r in rows],
        columns["width"].to_numpy(),
        columns["height"].to_numpy(),
    )
    metadata = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "class_names": class_names,
        "root": str(Path(root).absolute()),
        "description": description,
        "hash_algorithm": HASH_ALGORITHM,
        "hash_scheme": HASH_SCHEME,
        "content_hash": digest,
    }
    table = table.replace_schema_metadata(
        {f"meal.{k}".encode(): json.dumps(v, ensure_ascii=False).encode("utf-8") for k, v in metadata.items()}
    )
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    try:
        write_bytes(out, buffer.getvalue().to_pybytes())  # a local path or an fsspec URL, never half-written
    except OSError as e:
        raise ManifestError(f"cannot write manifest {out} ({e.strerror or e}): {_WRITABLE_HINT}") from e
    return digest


def load_manifest(
    path: str | os.PathLike, data_root: str | os.PathLike | None = None, with_digests: bool = False
) -> Manifest:
    """Read and verify a manifest.

    ``data_root`` replaces the recorded root (the images moved); None or ""
    (the config default) keeps the recorded one. ``with_digests`` keeps each
    image's recorded digest (``Manifest.digests``), for :func:`check_image_files`.
    """
    table = _read_table(path)
    path = path if is_url(path) else Path(path)

    fmt = _read_metadata(table.schema, "format", source=path)
    if fmt != MANIFEST_FORMAT:
        raise ManifestError(f"{path} is a {shown(fmt)} file, not a {MANIFEST_FORMAT!r}: {_BUILD_HINT}")
    version = _read_metadata(table.schema, "version", source=path)
    if type(version) is not int or version != MANIFEST_VERSION:
        raise ManifestError(
            f"manifest {path} has format version {shown(version)}; this tool reads version {MANIFEST_VERSION}: "
            f"{_REBUILD_HINT}, or use the tool version that wrote it"
        )
    algorithm = _read_metadata(table.schema, "hash_algorithm", source=path)
    if algorithm != HASH_ALGORITHM:
        raise ManifestError(
            f"manifest {path} uses hash algorithm {shown(algorithm)}; only {HASH_ALGORITHM!r} is supported: "
            f"{_REBUILD_HINT}"
        )
    scheme = _hash_scheme(table.schema, source=path)
    class_names = _read_metadata(table.schema, "class_names", source=path)
    if not isinstance(class_names, list) or not all(isinstance(c, str) for c in class_names):
        raise ManifestError(
            f"manifest {path}: metadata meal.class_names must be a JSON list of strings; {_REBUILD_HINT}"
        )
    if (duplicate_class := _first_duplicate(class_names)) is not None:
        raise ManifestError(f"manifest {path}: class name {shown(duplicate_class)} appears twice in meal.class_names; "
                            f"{_REBUILD_HINT} from folders with distinct names")
    recorded_root = _read_string_metadata(table.schema, "root", path, " (the image folder)")
    recorded_hash = _read_string_metadata(table.schema, "content_hash", path)
    description = _read_string_metadata(table.schema, "description", path)

    table = _conform_columns(table, path)
    if not table.num_rows:
        raise ManifestError(f"manifest {path} lists no images (0 rows): there is nothing to cache or train on; "
                            f"{_REBUILD_HINT} over a folder with images")
    image_ids = table.column("image_id").to_numpy()
    order = np.argsort(image_ids, kind="stable")
    if not np.array_equal(image_ids[order], np.arange(len(image_ids))):
        raise ManifestError(f"manifest {path}: image_id must be dense 0..{len(image_ids) - 1} without repeats")
    if not np.array_equal(order, np.arange(len(order))):
        table = table.take(pa.array(order))
    unsafe = np.flatnonzero(
        pc.match_substring_regex(table.column("path"), _UNSAFE_PATH_REGEX).to_numpy(zero_copy_only=False)
    )
    if unsafe.size:
        image_id = int(unsafe[0])
        rel = table.column("path")[image_id].as_py()
        raise ManifestError(
            f"manifest {path}: image {image_id} path {rel!r}: {check_relative_path(rel)}; {_REBUILD_HINT}"
        )
    paths = table.column("path").to_pylist()
    # A set of the strings already listed: at 1.28M paths ~0.5 s and ~30-80 MB transient, faster than
    # Arrow's count_distinct (~1.8 s) or unique (~0.7 s) on the same column (2-core machine).
    if len(set(paths)) != len(paths):
        duplicate = _first_duplicate(paths)
        ids = [i for i, p in enumerate(paths) if p == duplicate]
        raise ManifestError(f"manifest {path}: path {duplicate!r} appears more than once (images {ids[:5]}); "
                            f"{_REBUILD_HINT}")
    labels = table.column("label").to_numpy()
    bad = np.flatnonzero((labels < -1) | (labels >= len(class_names)))
    if bad.size:
        raise ManifestError(
            f"manifest {path}: image {int(bad[0])} has label {int(labels[bad[0]])} "
            f"outside -1..{len(class_names) - 1}"
        )
    widths = table.column("width").to_numpy()
    heights = table.column("height").to_numpy()
    actual_hash = _hash_columns(class_names, np.arange(len(paths)), labels, paths, table.column("sha256"),
                                widths, heights, scheme=scheme)
    if actual_hash != recorded_hash:
        raise ManifestError(
            f"manifest {path} was edited after it was built: content hash {actual_hash} "
            f"!= recorded {shown(recorded_hash)}; {_REBUILD_HINT}"
        )
    root = Path(data_root or recorded_root).expanduser().absolute()
    return Manifest(
        path=path,
        root=root,
        class_names=tuple(class_names),
        content_hash=recorded_hash,
        description=description,
        image_ids=np.arange(len(paths), dtype=np.int64),
        paths=paths,
        labels=labels.astype(np.int32),
        widths=widths.astype(np.int32),
        heights=heights.astype(np.int32),
        file_bytes=table.column("bytes").to_numpy().astype(np.int64),
        hash_algorithm=algorithm,
        hash_scheme=scheme,
        digests=table.column("sha256").combine_chunks() if with_digests else None,
    )


def check_image_files(manifest: Manifest, progress: bool | None = None, share: tuple[int, int] = (0, 1)) -> int:
    """Digest every image file and compare it with the manifest's record; return how many were checked.

    Finds a file replaced by another (of any size) after the build, which nothing
    else does: the loaders only notice a changed size. Files are read through
    :class:`ConfinedPaths` (no symlink escape) on a few threads (hashlib and file
    reads release the GIL), in bounded chunks, so memory does not grow with file
    size. ``share=(k, n)`` checks images k, k+n, k+2n, ... (one rank's part).
    ``progress`` None shows a bar only on a terminal. Raises :class:`ManifestError`
    naming the first few bad files and the count.
    """
    if manifest.digests is None:
        raise ValueError("check_image_files needs load_manifest(..., with_digests=True)")
    confined = ConfinedPaths(manifest)
    recorded = manifest.digests

    def problem(image_id: int) -> str | None:
        try:
            with open(confined(image_id), "rb") as f:
                digest = hashlib.file_digest(f, manifest.hash_algorithm)  # a name load_manifest accepted
        except ImageError as e:
            return f"{manifest.paths[image_id]} ({e.reason})"
        except OSError as e:
            return f"{manifest.paths[image_id]} (cannot read: {e.strerror or e})"
        if digest.hexdigest() != recorded[image_id].as_py():
            return f"{manifest.paths[image_id]} ({manifest.hash_algorithm} differs)"
        return None

    ids = range(share[0], manifest.num_images, share[1])
    workers = min(8, os.cpu_count() or 1)
    found = prefetch(problem, ids, workers=workers, depth=4 * workers, name="check-images")
    hidden = None if progress is None else not progress  # tqdm: None = shown on a terminal only
    bad = [p for p in tqdm(found, total=len(ids), desc="checking image digests", unit="img", disable=hidden) if p]
    if bad:
        more = f" and {len(bad) - _LISTED_MISMATCHES} more" if len(bad) > _LISTED_MISMATCHES else ""
        raise ManifestError(
            f"{len(bad)} of {len(ids)} image file(s) under {manifest.root} differ from manifest {manifest.path}: "
            f"{'; '.join(bad[:_LISTED_MISMATCHES])}{more}; restore the original files, or {_REBUILD_HINT} "
            "(a new manifest needs a new teacher cache)"
        )
    return len(ids)


def _read_table(path) -> pa.Table:
    """The Parquet table at a local path or an fsspec URL (file://, memory://, s3://, ...)."""
    try:
        if is_url(path):
            return pq.read_table(pa.BufferReader(read_bytes(path)))
        local = Path(path)
        if not local.is_file():
            what = "is not a file" if local.exists() else "does not exist"
            raise ManifestError(f"manifest {local} {what}: {_BUILD_HINT}")
        return pq.read_table(local)
    except FileNotFoundError:
        raise ManifestError(f"manifest {path} does not exist: {_BUILD_HINT}") from None
    except (pa.ArrowException, OSError) as e:
        raise ManifestError(f"manifest {path} is not a readable Parquet file ({e}): {_BUILD_HINT}") from e


def _conform_columns(table: pa.Table, path: Path) -> pa.Table:
    """Check every column is present, null-free and losslessly castable to SCHEMA."""
    columns = []
    for field in SCHEMA:
        if field.name not in table.column_names:
            raise ManifestError(f"manifest {path} lacks column {field.name!r}: {_REBUILD_HINT}")
        column = table.column(field.name)
        if column.null_count:
            raise ManifestError(f"manifest {path}: column {field.name!r} has {column.null_count} null value(s)")
        try:
            columns.append(column.cast(field.type, safe=True).combine_chunks())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise ManifestError(
                f"manifest {path}: column {field.name!r} has type {column.type}, expected {field.type} ({e})"
            ) from e
    digests = columns[SCHEMA.get_field_index("sha256")]
    bad = np.flatnonzero(~pc.match_substring_regex(digests, r"^[0-9a-f]{64}$").to_numpy(zero_copy_only=False))
    if bad.size:
        raise ManifestError(
            f"manifest {path}: image {int(bad[0])} sha256 {digests[int(bad[0])].as_py()!r} "
            "is not a 64-char lowercase hex digest"
        )
    return pa.Table.from_arrays(columns, schema=SCHEMA)


def _read_metadata(schema: pa.Schema, key: str, source: object):
    metadata = schema.metadata or {}
    raw = metadata.get(f"meal.{key}".encode())
    if raw is None:
        raise ManifestError(f"{source} is not a MEAL V2 manifest (no meal.{key} metadata): {_BUILD_HINT}")
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{source}: metadata meal.{key} is not valid JSON ({e}); {_REBUILD_HINT}") from e
    except RecursionError:  # a hostile file nests arrays deeper than the decoder can follow
        raise ManifestError(f"{source}: metadata meal.{key} is nested too deeply to be a manifest's; "
                            f"{_REBUILD_HINT}") from None


def _hash_scheme(schema: pa.Schema, source: object) -> int:
    """The table's ``meal.hash_scheme``; 1 when absent (written before the key existed)."""
    if b"meal.hash_scheme" not in (schema.metadata or {}):
        return _LEGACY_HASH_SCHEME
    scheme = _read_metadata(schema, "hash_scheme", source=source)
    if type(scheme) is not int or not _LEGACY_HASH_SCHEME <= scheme <= HASH_SCHEME:
        raise ManifestError(f"manifest {source} uses content hash scheme {shown(scheme)}; this tool knows "
                            f"{_LEGACY_HASH_SCHEME}..{HASH_SCHEME}: upgrade the tool, or {_REBUILD_HINT}")
    return scheme


def _read_string_metadata(schema: pa.Schema, key: str, path: object, meaning: str = "") -> str:
    """``meal.{key}``, refused unless a JSON string; ``meaning`` (" (the image folder)") follows "string" in the error."""
    value = _read_metadata(schema, key, source=path)
    if not isinstance(value, str):
        raise ManifestError(f"manifest {path}: metadata meal.{key} must be a JSON string{meaning}, not "
                            f"{shown(value)}; {_REBUILD_HINT}")
    return value


def _first_duplicate(items: Iterable[str]) -> str | None:
    seen: set[str] = set()
    for item in items:
        if item in seen:
            return item
        seen.add(item)
    return None
