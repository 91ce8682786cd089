"""Teacher cache v1: a Zarr v3 group of soft labels and crop boxes.

Layout (``N`` images, ``C`` crops per image, ``k`` kept classes)::

    boxes        int32   [N, C, 4]   x, y, w, h in the EXIF-oriented image frame
    flip         uint8   [N, C]      1 = mirrored
    topk_index   uint16  [N, C, k]   (int32 when classes > 65535), by falling prob
    topk_prob    float16 [N, C, k]   ensemble probability of those classes
    shard_record uint32  [S, 5]      per shard: done flag + crc32 of the 4 arrays

Every data array is chunked by shard (``images_per_shard`` images), so a shard
is one file per array and a writer that owns a shard owns those files alone
(concurrent writers to one Zarr chunk lose data). A shard's record is written
*after* its data; a crash leaves the record at its fill value 0 = incomplete,
and an incomplete shard is never served. The crc32 values let ``verify`` catch
truncated or bit-flipped files; the Crc32c codec makes a damaged chunk fail
loudly on read as well.

The group attributes (JSON, no pickle anywhere) make the cache self-describing:
format + version, manifest hash and size, classes, teachers, ensemble rule,
crop policy, storage, tool version and the resolved config. How targets are
stored and restored (index dtype, float16 rounding, residual) and how every
command builds those attributes is common/cache_storage.py.

A cache can grow to more crops per image (stage1_teacher_cache/grow.py): while
it does, its attributes carry a ``growing`` marker and readers refuse it; after,
it is an ordinary cache with the new crop count and a ``grown`` history.

A cache location is a local directory, a ``file://`` URL (opened as a local
directory) or any other fsspec URL (``s3://``, ``gs://``, ``memory://``...).
Opening a cache from a stranger is bounded: every file a reader opens must be a
regular file (checked with lstat: a symlink, FIFO or device is refused by
name) under a size limit, its JSON metadata is parsed with a depth limit, the
attributes are validated by type and range (``_check_attrs``, the one place),
its arrays must have exactly the shapes, chunks, dtypes and codecs this module
writes, and each zstd frame is decoded into a buffer of the declared chunk
size, so no read allocates more than one shard. Per-shard work iterates over
the record files present, so its cost follows what is on disk, not what the
attributes declare (docs/reliability.md).
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import threading
import uuid
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.core.buffer.cpu import as_numpy_array_wrapper
from zarr.registry import get_pipeline_class

from common.cache_storage import CacheError, index_dtype, round_down_fp16, target_problems
from common.errors import cause_text, shown
from common.locations import file_sizes, filesystem, local_path

FORMAT_NAME = "meal-v2-teacher-cache"
FORMAT_VERSION = 1
TOOL_VERSION = "0.1.0"
DATA_ARRAYS = ("boxes", "flip", "topk_index", "topk_prob")
RECORD_ARRAY = "shard_record"

# Attributes that must agree for two runs to write into one cache.
IDENTITY_KEYS = ("manifest", "num_classes", "teachers", "ensemble", "crops", "storage")

# Bounds on what a cache from a stranger can make a reader do (see docs/reliability.md).
MAX_METADATA_BYTES = 16 << 20  # per zarr.json; a 1000-class cache's is ~20 KB
MAX_CHUNK_BYTES = 256 << 20  # one shard of one array, decoded; ImageNet at C=32, k=100 needs 13 MB
MAX_CACHED_BYTES = 1 << 30  # a reader's shard LRU, whatever the shard size
CODEC_CHAIN = ("bytes", "zstd", "crc32c")  # what CacheWriter writes, in this order, each once
# Sane maxima of the declared layout, stated once; the writer is held to them too.
MAX_IMAGES = (1 << 31) - 1  # image ids are int32 in places (loaders, DALI sample ids)
MAX_CROPS = 1 << 12  # MEAL V2 / FKD use at most a few hundred crops per image
MAX_CLASSES = 1 << 20  # dense targets are [batch, classes] float32: 1M classes is 4 MB per row already
MAX_SHARDS = 1 << 20  # per-shard bookkeeping ([shards, 5] records) stays <= 20 MB; ImageNet has ~1,300
MAX_DECLARED_BYTES = 1 << 44  # 16 TiB decoded: 50x ImageNet-21k at C=32, k=100
MAX_JSON_DEPTH = 32  # a cache's attributes nest ~6 deep; the json module and == recurse per level
MAX_TREE_DEPTH = 8  # deepest cache file: .grow-staging/topk_prob/c/S/0/0 (6 parts)


def shard_bounds(shard: int, images_per_shard: int, num_images: int) -> tuple[int, int]:
    start = shard * images_per_shard
    return start, min(start + images_per_shard, num_images)


def _checksum(a: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(a).view(np.uint8).tobytes()) & 0xFFFFFFFF


def _open_group(location: str | Path, mode: str) -> zarr.Group:
    """file:// URLs are opened as paths on purpose: zarr's LocalStore writes every file atomically
    (temp + rename), fsspec's local filesystem writes in place, so a kill could leave a torn chunk
    behind a completion record."""
    path = local_path(location)
    if path is None:
        filesystem(location)  # a missing backend (s3fs, gcsfs) fails here with the extra to install
    return zarr.open_group(store=str(location) if path is None else path, mode=mode, zarr_format=3)


def _file_kind(mode: int) -> str:
    return ("a symbolic link" if stat.S_ISLNK(mode) else "a directory" if stat.S_ISDIR(mode)
            else "a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")


def _not_regular(location: str | Path, name: str, mode: int) -> CacheError:
    # lstat, never stat: a link to /dev/zero or a FIFO would make the read endless
    return CacheError(f"{location}: {name} is {_file_kind(mode)}, not a regular file; a cache holds only regular "
                      "files and folders (refusing to follow or open it): this is not a cache written by this tool")


def load_json_bounded(data: bytes, where: str) -> Any:
    """Parsed JSON, refusing nesting deeper than MAX_JSON_DEPTH (before the json module or a later
    comparison recurses into a RecursionError) and non-JSON; errors name ``where``."""
    try:
        parsed = json.loads(data)
    except (ValueError, RecursionError) as e:  # RecursionError: nested past the interpreter's limit
        raise CacheError(f"{where}: not valid JSON ({cause_text(e, 120)})") from None
    level = [parsed]
    for depth in range(MAX_JSON_DEPTH + 1):  # breadth-first, one level at a time: no recursion
        level = [v for x in level if isinstance(x, (dict, list)) for v in (x.values() if isinstance(x, dict) else x)]
        if not level:
            return parsed
    raise CacheError(f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels; this is not metadata written by "
                     "this tool")


def _read_metadata(location: str | Path, key: str) -> Any:
    """One metadata file of the store, parsed (None if absent): a regular file (lstat) of at most
    MAX_METADATA_BYTES, checked before a byte is read or zarr parses it."""
    path = local_path(location)
    where = f"{location}: {key}"
    if path is not None:
        try:
            st = os.lstat(path / key)
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(st.st_mode):
            raise _not_regular(location, key, st.st_mode)
        size = st.st_size
    else:
        fs, root = filesystem(location)
        remote_key = f"{root.rstrip('/')}/{key}"
        try:
            size = int(fs.size(remote_key))
        except FileNotFoundError:
            return None
    if size > MAX_METADATA_BYTES:
        raise CacheError(
            f"{location}: {key} is {size:,} bytes, over the {MAX_METADATA_BYTES:,}-byte limit for cache "
            "metadata; this is not a cache written by this tool"
        )
    if path is not None:
        # O_NOFOLLOW | O_NONBLOCK: a file swapped for a link or FIFO since the lstat is refused, not followed
        fd = os.open(path / key, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            data = f.read(MAX_METADATA_BYTES + 1)
    else:
        data = fs.cat_file(remote_key)
    if len(data) > MAX_METADATA_BYTES:
        raise CacheError(f"{where}: grew past the {MAX_METADATA_BYTES:,}-byte metadata limit while being read")
    return load_json_bounded(data, where)


def _check_metadata(location: str | Path) -> None:
    """Check and parse every metadata file present. Refuses oversized, special or too deeply nested
    files before zarr parses them (a forged zarr.json could exhaust memory)."""
    for name in ("", *DATA_ARRAYS, RECORD_ARRAY):
        _read_metadata(location, f"{name}/zarr.json" if name else "zarr.json")


def cache_files(location: str | Path) -> dict[str, int]:
    """``{relative POSIX name: size}`` of every file of a cache, sorted. Locally the tree is walked
    with lstat only (never following a link) and anything but a regular file or folder, or a
    folder nested deeper than any cache's, is refused by name; object stores hold only objects,
    sized by their listing."""
    return _walk(location)[0]


def _walk(location: str | Path) -> tuple[dict[str, int], list[str]]:
    """(cache_files, the folders' relative names); no folders on an object store."""
    root = local_path(location)
    if root is None:
        return file_sizes(location), []
    files: dict[str, int] = {}
    folders: list[str] = []
    pending = [(root, "")]
    while pending:  # iterative: a tree 2,000 folders deep must not recurse
        folder, prefix = pending.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                name = prefix + entry.name
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    if name.count("/") + 1 >= MAX_TREE_DEPTH:
                        raise CacheError(f"{location}: {name} is nested deeper than any cache's files "
                                         f"({MAX_TREE_DEPTH} levels); this is not a cache written by this tool")
                    folders.append(name)
                    pending.append((Path(entry.path), name + "/"))
                elif stat.S_ISREG(st.st_mode):
                    files[name] = st.st_size
                else:
                    raise _not_regular(location, name, st.st_mode)
    return dict(sorted(files.items())), folders


def describe_difference(found: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Human-readable list of identity attributes that differ."""
    return [f"{key}: cache has {found.get(key)!r}, this run has {wanted.get(key)!r}"
            for key in IDENTITY_KEYS if found.get(key) != wanted.get(key)]


@dataclass
class CacheLayout:
    num_images: int
    num_crops: int
    topk: int
    num_classes: int
    images_per_shard: int

    @property
    def num_shards(self) -> int:
        return max(1, -(-self.num_images // self.images_per_shard))

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any], path: str | Path = "cache") -> "CacheLayout":
        """The layout the attributes declare, each value checked by type and range (_int_attr), refusing
        one whose shards, shard count or total size are absurd."""
        num_classes = _int_attr(attrs, "num_classes", 1, MAX_CLASSES, path)
        L = cls(
            num_images=_int_attr(attrs, "manifest.num_images", 0, MAX_IMAGES, path),
            num_crops=_int_attr(attrs, "crops.num_crops", 1, MAX_CROPS, path),
            topk=_int_attr(attrs, "storage.k", 1, num_classes, path),
            num_classes=num_classes,
            images_per_shard=_int_attr(attrs, "storage.images_per_shard", 1, MAX_IMAGES, path),
        )
        chunk_bytes = L.images_per_shard * L.num_crops * max(4, L.topk) * 4
        if chunk_bytes > MAX_CHUNK_BYTES:
            raise CacheError(f"{path}: a shard would decode to {chunk_bytes:,} bytes, over the {MAX_CHUNK_BYTES:,} "
                             "limit")
        if L.num_shards > MAX_SHARDS:
            raise CacheError(f"{path}: {L.num_images:,} images at {L.images_per_shard:,} per shard make "
                             f"{L.num_shards:,} shards, over the {MAX_SHARDS:,}-shard limit; use at least "
                             f"{-(-L.num_images // MAX_SHARDS):,} images per shard")
        if L.declared_bytes > MAX_DECLARED_BYTES:
            raise CacheError(f"{path}: the attributes declare {L.declared_bytes:,} bytes of soft labels, over the "
                             f"{MAX_DECLARED_BYTES:,}-byte limit")
        return L

    @property
    def declared_bytes(self) -> int:
        """Decoded size of the four data arrays."""
        per_crop = 4 * 4 + 1 + self.topk * (index_dtype(self.num_classes).itemsize + 2)
        return self.num_images * self.num_crops * per_crop

    def array_specs(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], np.dtype]]:
        """name -> (shape, chunks, dtype) of every array: one chunk per shard along axis 0."""
        N, C, k = self.num_images, self.num_crops, self.topk
        n = min(self.images_per_shard, max(1, N))
        fields = 1 + len(DATA_ARRAYS)
        return {
            "boxes": ((N, C, 4), (n, C, 4), np.dtype(np.int32)),
            "flip": ((N, C), (n, C), np.dtype(np.uint8)),
            "topk_index": ((N, C, k), (n, C, k), index_dtype(self.num_classes)),
            "topk_prob": ((N, C, k), (n, C, k), np.dtype(np.float16)),
            RECORD_ARRAY: ((self.num_shards, fields), (1, fields), np.dtype(np.uint32)),
        }


def _attr(attrs: dict[str, Any], dotted: str, kind: type, path: str | Path) -> Any:
    """``attrs["a"]["b"]`` for ``"a.b"``, refused by name when missing or not of ``kind``."""
    value: Any = attrs
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise CacheError(f"{path}: zarr.json: cache attribute {dotted!r} is missing; this is not a complete "
                             "teacher cache written by this tool")
        value = value[part]
    # bool is an int in Python: `true` must not read as 1
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise CacheError(f"{path}: zarr.json: cache attribute {dotted!r} = {shown(value)} must be {kind.__name__}; "
                         "this is not a cache written by this tool")
    return value


def _int_attr(attrs: dict[str, Any], dotted: str, lo: int, hi: int, path: str | Path) -> int:
    value = _attr(attrs, dotted, int, path)
    if not lo <= value <= hi:
        raise CacheError(f"{path}: zarr.json: cache attribute {dotted!r} = {value:,} is outside {lo:,}..{hi:,}; "
                         "this is not a cache written by this tool")
    return value


def _check_attrs(attrs: dict[str, Any], path: str | Path) -> CacheLayout:
    """The one validation of a cache's attributes by type and range; returns the layout they declare.
    Checks what readers index into (identity, teachers, growth marker); descriptive attributes are
    only displayed."""
    _check_format(attrs, path)
    _attr(attrs, "manifest.hash", str, path)
    for key in ("ensemble", "storage", "crops"):
        _attr(attrs, key, dict, path)
    teachers = _attr(attrs, "teachers", list, path)
    for i, teacher in enumerate(teachers):
        if not isinstance(teacher, dict) or not isinstance(teacher.get("name"), str):
            raise CacheError(f"{path}: zarr.json: cache attribute 'teachers[{i}]' = {shown(teacher)} must be an "
                             "object with a string 'name'; this is not a cache written by this tool")
    growing = attrs.get("growing")
    if growing is not None and growing is not False:
        _attr(attrs, "growing", dict, path)
        _int_attr(attrs, "growing.from_crops", 1, MAX_CROPS, path)
        _int_attr(attrs, "growing.to_crops", 1, MAX_CROPS, path)
    return CacheLayout.from_attrs(attrs, path)


def _check_array_metadata(arr, name: str, path: str | Path) -> None:
    """Codecs, fill value, storage transformers and chunk key encoding exactly as CacheWriter writes them."""
    meta = arr.metadata
    codecs = [codec.to_dict()["name"] for codec in meta.codecs]
    if not set(codecs) <= set(CODEC_CHAIN):
        raise CacheError(f"{path}: array {name} uses codecs {sorted(set(codecs) - set(CODEC_CHAIN))}, "
                         f"which this tool never writes (it writes {sorted(CODEC_CHAIN)})")
    if tuple(codecs) != CODEC_CHAIN:
        raise CacheError(f"{path}: array {name} has codecs {codecs}; this tool writes exactly {list(CODEC_CHAIN)}")
    if meta.storage_transformers:
        raise CacheError(f"{path}: {name}/zarr.json declares storage_transformers, which this tool never writes")
    if meta.fill_value != 0:
        raise CacheError(f"{path}: {name}/zarr.json has fill_value {shown(np.asarray(meta.fill_value).item())}; this "
                         "tool writes 0 (an absent chunk must read as zeros, an absent record as 'incomplete')")
    encoding = meta.chunk_key_encoding
    if encoding.name != "default" or getattr(encoding, "separator", "/") != "/":
        raise CacheError(f"{path}: {name}/zarr.json has chunk key encoding {encoding.to_dict()}; this tool writes "
                         "the default one with '/'")


class _BoundedZstdCodec(ZstdCodec):
    """zstd that decodes a chunk only into a buffer of the chunk's declared size.

    numcodecs would allocate whatever a frame header declares (a 67 KB frame can declare 2 GB) and
    stream frames that declare nothing; here the frame must declare exactly the chunk's size and is
    decoded into that many bytes, so a bomb fails before any large allocation."""

    def _decode_sync(self, chunk_bytes, chunk_spec):
        expected = int(np.prod(chunk_spec.shape)) * chunk_spec.dtype.to_native_dtype().itemsize
        return as_numpy_array_wrapper(lambda data: self._bounded_decode(data, expected), chunk_bytes,
                                      chunk_spec.prototype)

    def _bounded_decode(self, data: np.ndarray, expected: int) -> np.ndarray:
        declared = zstd_content_size(data)
        if declared != expected:
            raise ValueError(f"zstd frame declares {'no' if declared is None else f'{declared:,}'} decoded bytes, "
                             f"the chunk holds {expected:,}")
        out = np.empty(expected, np.uint8)
        self._zstd_codec.decode(data, out=out)  # numcodecs refuses (concatenated) frames needing more
        return out


def zstd_content_size(frame: np.ndarray | bytes) -> int | None:
    """The decoded size a zstd frame header declares (RFC 8878, 3.1.1.1); None when absent."""
    head = bytes(frame[:18])
    if len(head) < 6 or head[:4] != b"\x28\xb5\x2f\xfd":
        return None
    descriptor = head[4]
    fcs_flag, single_segment, dict_flag = descriptor >> 6, (descriptor >> 5) & 1, descriptor & 3
    size = (1 if single_segment else 0, 2, 4, 8)[fcs_flag]
    if size == 0:
        return None
    at = 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[dict_flag]
    field = head[at : at + size]
    if len(field) < size:
        return None
    return int.from_bytes(field, "little") + (256 if size == 2 else 0)


def _bound_decoding(arr) -> None:
    """Swap the array's zstd codec for the bounded one (reads only; encoding is the same)."""
    codecs = [_BoundedZstdCodec(level=c.level, checksum=c.checksum) if isinstance(c, ZstdCodec) else c
              for c in arr.metadata.codecs]
    object.__setattr__(arr.async_array, "codec_pipeline", get_pipeline_class().from_codecs(codecs))


def max_chunk_file_bytes(chunks: tuple[int, ...], dtype: np.dtype) -> int:
    """Largest file a legitimate chunk can be: zstd's worst case (ZSTD_compressBound: + 1/256 + 128 KB
    margins for small inputs) plus the 4-byte crc32c, with slack."""
    decoded = int(np.prod(chunks)) * dtype.itemsize
    return decoded + (decoded >> 8) + (128 << 10 >> 11) + 4 + 1024


def _check_chunk_files(files: dict[str, int], folders: list[str], layout: CacheLayout, path: str | Path) -> None:
    """Refuse a folder where a chunk file belongs, and a chunk file larger than its array's chunk can
    be compressed to (the store reads a chunk file whole)."""
    specs = layout.array_specs()
    for name in folders:
        parts = name.split("/")
        if parts[0] in specs and parts[1:2] == ["c"] and len(parts) == 2 + len(specs[parts[0]][1]):
            raise _not_regular(path, name, stat.S_IFDIR)
    limits = {name: max_chunk_file_bytes(chunks, dtype) for name, (_, chunks, dtype) in specs.items()}
    for name, size in files.items():
        array, sep, rest = name.partition("/")
        if array in limits and rest.startswith("c/") and size > limits[array]:
            raise CacheError(f"{path}: {name} is {size:,} bytes, more than a chunk of array {array} can occupy "
                             f"({limits[array]:,} bytes); this is not a cache written by this tool")


def _present_shards(files: dict[str, int], num_shards: int) -> np.ndarray:
    """Shards whose completion record file exists (sorted): the only records worth reading."""
    records = [parts for parts in (name.split("/") for name in files)
               if len(parts) == 4 and parts[:2] == [RECORD_ARRAY, "c"] and parts[3] == "0" and parts[2].isdigit()]
    return np.array(sorted(s for s in (int(parts[2]) for parts in records) if s < num_shards), dtype=np.int64)


def _check_arrays(group: zarr.Group, layout: CacheLayout, path: str | Path) -> dict[str, Any]:
    """The arrays, if each has exactly the shape, chunking, dtype and codecs the layout implies."""
    arrays = {}
    for name, (shape, chunks, dtype) in layout.array_specs().items():
        try:
            arr = group[name]
        except KeyError:
            raise CacheError(f"{path}: array {name} is missing") from None
        except Exception as e:  # zarr refusing the metadata (an unknown codec, transformer or type)
            raise CacheError(f"{path}: {name}/zarr.json: not an array this tool reads ({cause_text(e, 160)})") from e
        found = (tuple(arr.shape), tuple(arr.chunks), np.dtype(arr.dtype))
        if found != (shape, chunks, dtype):
            raise CacheError(
                f"{path}: array {name} has shape {found[0]}, chunks {found[1]}, dtype {found[2]}; "
                f"the attributes imply {shape}, {chunks}, {dtype}"
            )
        _check_array_metadata(arr, name, path)
        _bound_decoding(arr)
        arrays[name] = arr
    return arrays


def _check_format(attrs: dict[str, Any], path: str | Path) -> None:
    fmt, ver = attrs.get("format"), attrs.get("version")
    if fmt != FORMAT_NAME:
        raise CacheError(f"{path}: not a teacher cache (format attribute is {fmt!r}, expected {FORMAT_NAME!r})")
    if isinstance(ver, bool) or not isinstance(ver, int):
        raise CacheError(f"{path}: zarr.json: cache attribute 'version' = {shown(ver)} must be an integer; "
                         "this is not a cache written by this tool")
    if ver > FORMAT_VERSION:
        raise CacheError(
            f"{path}: cache format version {ver!r} is newer than this tool reads (v{FORMAT_VERSION}); "
            "upgrade the pipeline package to read it"
        )
    if ver < FORMAT_VERSION:
        raise CacheError(f"{path}: cache format version {ver} is older than v{FORMAT_VERSION}; rebuild the cache")


def _check_not_growing(attrs: dict[str, Any], path: str | Path) -> None:
    """A cache mid-grow (stage1_teacher_cache/grow.py) is neither its old self nor the grown one yet."""
    if marker := attrs.get("growing"):
        more = marker["to_crops"] - marker["from_crops"]  # ints: _check_attrs checked them first
        raise CacheError(
            f"{path}: is being grown from {marker.get('from_crops')} to {marker.get('to_crops')} crops per image "
            f"(started {marker.get('started_at')}) and cannot be used until that finishes; rerun the same "
            f"`pipeline teacher-cache ... --more-crops {more}` command to finish it (or drop it: "
            f"`pipeline cache abandon-growth {path}`)"
        )


def open_attrs(path: str | Path) -> dict[str, Any]:
    """The group attributes at ``path``; {} where there is no group (or one without attributes)."""
    try:
        meta = _read_metadata(path, "zarr.json")
    except (FileNotFoundError, NotADirectoryError):
        return {}
    if not isinstance(meta, dict) or meta.get("node_type") != "group":
        return {}
    attrs = meta.get("attributes")
    return dict(attrs) if isinstance(attrs, dict) else {}


def put_attrs(path: str | Path, attrs: dict[str, Any]) -> None:
    """Replace every attribute in one metadata write (atomic on local disks: zarr writes temp + rename)."""
    _open_group(path, mode="r+").attrs.put(attrs)


class CacheWriter:
    """Creates a cache (or reopens a compatible one) and writes whole shards."""

    def __init__(self, path: str | Path, attrs: dict[str, Any]):
        self.path = str(path)
        wanted = dict(attrs, format=FORMAT_NAME, version=FORMAT_VERSION, tool_version=TOOL_VERSION)
        self.layout = CacheLayout.from_attrs(wanted, self.path)
        local = local_path(self.path)
        if local is None:
            self._create_remote(wanted)
        elif not (local.exists() and any(local.iterdir())):
            self._create_local(local, wanted)
        _check_metadata(self.path)
        group = _open_group(self.path, mode="r+")
        found = dict(group.attrs)
        if not found:
            raise CacheError(
                f"{self.path}: exists but has no cache attributes (another writer may be creating it, or a "
                "creation was interrupted; if no other run is writing it, delete it and rerun)"
            )
        _check_attrs(found, self.path)
        _check_not_growing(found, self.path)
        if diffs := describe_difference(found, wanted):
            raise CacheError(
                f"{self.path}: refusing to add to a cache built with different inputs:\n  - "
                + "\n  - ".join(diffs)
                + "\nWrite to a new --out directory, or rerun with the settings the cache was built with."
            )
        self.group = group
        self.attrs = found
        self.arrays = _check_arrays(group, self.layout, self.path)

    def _create_local(self, path: Path, attrs: dict[str, Any]) -> None:
        """Build the empty cache beside ``path`` and rename it into place: a kill during creation
        leaves no half-made cache (only a hidden ``.NAME.creating-*`` directory)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.creating-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            self._create(_open_group(tmp, mode="w-"), attrs)
            os.rename(tmp, path)  # atomic; replaces an empty directory, fails on a non-empty one
        except OSError:
            if not (path.exists() and any(path.iterdir())):
                raise
            # another writer created it first: use theirs (the identity check follows)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _create_remote(self, attrs: dict[str, Any]) -> None:
        """Object stores have no atomic directory rename: create in place, attributes last."""
        try:
            group = _open_group(self.path, mode="w-")
        except (FileExistsError, zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayError):
            return
        self._create(group, attrs)

    def _create(self, group: zarr.Group, attrs: dict[str, Any]) -> None:
        compressors = [ZstdCodec(level=3), Crc32cCodec()]
        for name, (shape, chunks, dtype) in self.layout.array_specs().items():
            group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=0, compressors=compressors)
        # Attributes last: a group without them is recognisably unfinished.
        group.attrs.update(attrs)

    def shard_range(self, shard: int) -> tuple[int, int]:
        return shard_bounds(shard, self.layout.images_per_shard, self.layout.num_images)

    def complete_shards(self) -> np.ndarray:
        """Boolean mask of shards whose completion record is written."""
        return _read_records(self.arrays[RECORD_ARRAY], self.path)[:, 0] == 1

    def write_shard(self, shard: int, boxes: np.ndarray, flip: np.ndarray, topk_index: np.ndarray, topk_prob: np.ndarray) -> None:
        """Write one whole shard, then its completion record (the commit point)."""
        start, stop = self.shard_range(shard)
        L, n = self.layout, stop - start
        data = {
            "boxes": np.asarray(boxes, dtype=np.int32).reshape(n, L.num_crops, 4),
            "flip": np.asarray(flip, dtype=np.uint8).reshape(n, L.num_crops),
            "topk_index": np.asarray(topk_index).astype(index_dtype(L.num_classes)).reshape(n, L.num_crops, L.topk),
            "topk_prob": round_down_fp16(topk_prob).reshape(n, L.num_crops, L.topk),
        }
        record = np.array([[1, *(_checksum(data[name]) for name in DATA_ARRAYS)]], dtype=np.uint32)
        try:
            for name in DATA_ARRAYS:
                self.arrays[name][start:stop] = data[name]
            self.arrays[RECORD_ARRAY][shard : shard + 1] = record
        except OSError as e:  # the shard's record stays unset (written last, and atomically on local disks)
            full = e.errno in (errno.ENOSPC, errno.EDQUOT)
            raise CacheError(
                f"{self.path}: writing shard {shard} failed: {e.strerror or e}"
                + (" (disk full or quota exceeded)" if full else "")
                + f"; shard {shard} is not marked complete and the shards before it are kept. "
                + ("Free some space, then rerun" if full else "Fix the cause, then rerun")
                + " the same command to resume."
            ) from e


def _read_records(arr, path: str, present: np.ndarray | None = None) -> np.ndarray:
    """Shard records. "Incomplete" means a record that is absent (it reads as the fill value 0)
    or not marked done; a record that cannot be *read* is an error, never "incomplete": a
    transient object-store failure must stop the run, not make it recompute finished shards.
    With ``present`` (the shards whose record file exists) only those are read: the cost follows
    the files on disk, not the shard count the attributes declare."""
    try:
        if present is None:
            return np.asarray(arr[:])
        records = np.zeros(arr.shape, dtype=np.uint32)
        if present.size:
            records[present] = np.asarray(arr.get_orthogonal_selection((present, slice(None))))
        return records
    except Exception as e:
        unreadable = _unreadable_records(arr, present)[1]
        shards = f"shard(s) {sorted(unreadable)[:5]}" if unreadable else "the records"
        raise CacheError(
            f"{path}: cannot read the completion record of {shards} ({cause_text(e)}). If the storage failed "
            "for a moment, rerun; if `pipeline cache verify` reports the record damaged, "
            "`pipeline cache verify --repair` resets it so that the shard is recomputed"
        ) from e


def _unreadable_records(arr, present: np.ndarray | None = None) -> tuple[np.ndarray, dict[int, str]]:
    """Records read one by one (those of ``present`` only, when given): (records with unreadable
    and absent rows zeroed, {shard: why unreadable})."""
    records, unreadable = np.zeros(arr.shape, dtype=np.uint32), {}
    for s in range(arr.shape[0]) if present is None else present.tolist():
        try:
            records[s] = np.asarray(arr[s : s + 1])[0]
        except Exception as e:
            unreadable[s] = cause_text(e, 120)
    return records, unreadable


class CacheReader:
    """Read access for stage 2 and tools; refuses caches that do not match.

    Shards are read whole and kept in a small LRU (bounded in count and bytes),
    which matches how Zarr stores them (one chunk per shard) and bounds memory
    for any dataset size.
    With ``verify_checksums`` every shard read is compared with its completion
    record (tools that copy a cache use it, so damage is not propagated).
    """

    def __init__(
        self,
        path: str | Path,
        manifest_hash: str | None = None,
        num_classes: int | None = None,
        require_complete: bool = True,
        manifest_images: int | None = None,
        max_cached_shards: int = 64,
        verify_checksums: bool = False,
        _report_unreadable_records: bool = False,
        _while_growing: bool = False,
    ):
        self.path = str(path)
        local = local_path(self.path)
        if local is not None and not local.exists():
            raise CacheError(f"teacher cache {self.path} does not exist; build it with `pipeline teacher-cache`")
        # Cheapest checks first, each before the work it protects: metadata files (kind, size, nesting)
        # before zarr parses them, the attributes' types and ranges before anything is sized by them,
        # the manifest before the tree is listed, chunk file sizes before any chunk is read.
        _check_metadata(self.path)
        try:
            group = _open_group(self.path, mode="r")
        except Exception as e:
            raise CacheError(f"{self.path}: not a readable Zarr v3 teacher cache ({cause_text(e, 300)})") from e
        self.attrs = dict(group.attrs)
        self.layout = _check_attrs(self.attrs, self.path)
        # Only the grower and `cache info` look inside a cache mid-grow, and only before its swap
        # (during it, its arrays and attributes disagree).
        if not _while_growing or (self.attrs.get("growing") or {}).get("phase") == "swapping":
            _check_not_growing(self.attrs, self.path)
        self._check_manifest(manifest_hash, manifest_images, num_classes)
        self.arrays = _check_arrays(group, self.layout, self.path)
        self.files, folders = _walk(self.path)
        _check_chunk_files(self.files, folders, self.layout, self.path)
        present = _present_shards(self.files, self.layout.num_shards)
        # {shard: why its record is unreadable}; only `verify` asks for a report instead of an error
        self.unreadable_records: dict[int, str] = {}
        if _report_unreadable_records:
            self.records, self.unreadable_records = _unreadable_records(self.arrays[RECORD_ARRAY], present)
        else:
            self.records = _read_records(self.arrays[RECORD_ARRAY], self.path, present)
        self.complete = self.records[:, 0] == 1
        if require_complete and not self.complete.all():
            missing = np.flatnonzero(~self.complete)
            raise CacheError(
                f"{self.path}: {len(missing)} of {len(self.complete)} shards are incomplete "
                f"(e.g. shard {missing[:5].tolist()}); rerun the same `pipeline teacher-cache` command to finish it"
            )
        self.verify_checksums = verify_checksums
        self._shards: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()  # the LRU is shared by the loader's planning thread and its caller
        self._max_cached = max_cached_shards
        self._cached_bytes = 0

    def _check_manifest(self, manifest_hash: str | None, manifest_images: int | None, num_classes: int | None) -> None:
        L = self.layout
        if manifest_hash is not None and self.attrs["manifest"]["hash"] != manifest_hash:
            raise CacheError(
                f"{self.path}: built for manifest {self.attrs['manifest']['hash'][:16]}... "
                f"({L.num_images} images) but the given manifest is {manifest_hash[:16]}...; "
                "pass the manifest the cache was built from, or rebuild the cache for this manifest"
            )
        if manifest_images is not None and L.num_images != manifest_images:
            raise CacheError(
                f"{self.path}: zarr.json declares {L.num_images:,} images but the manifest has {manifest_images:,}; "
                "the cache does not belong to this manifest: rebuild it with `pipeline teacher-cache`"
            )
        if num_classes is not None and L.num_classes != num_classes:
            raise CacheError(
                f"{self.path}: cache has {L.num_classes} classes but {num_classes} were expected; "
                "the student's class count must equal the teachers'"
            )

    # the layout's sizes (ints), read as the reader's own
    num_images = property(attrgetter("layout.num_images"))
    num_crops = property(attrgetter("layout.num_crops"))
    num_classes = property(attrgetter("layout.num_classes"))
    topk = property(attrgetter("layout.topk"))

    def read_shard(self, shard: int) -> dict[str, np.ndarray]:
        with self._lock:
            return self._read_shard(shard)

    def _read_shard(self, shard: int) -> dict[str, np.ndarray]:
        if shard in self._shards:
            self._shards.move_to_end(shard)
            return self._shards[shard]
        if not self.complete[shard]:
            raise CacheError(f"{self.path}: shard {shard} is incomplete; rerun `pipeline teacher-cache` to finish it")
        start, stop = shard_bounds(shard, self.layout.images_per_shard, self.num_images)
        try:
            data = {name: np.asarray(self.arrays[name][start:stop]) for name in DATA_ARRAYS}
        except Exception as e:
            raise CacheError(
                f"{self.path}: shard {shard} (images {start}..{stop - 1}) is damaged or unreadable ({cause_text(e, 300)}); "
                "if the storage failed for a moment, rerun; else run `pipeline cache verify --repair` and rebuild "
                "the damaged shards"
            ) from e
        if self.verify_checksums:
            altered = [name for j, name in enumerate(DATA_ARRAYS) if _checksum(data[name]) != self.records[shard, 1 + j]]
            if altered:
                raise CacheError(
                    f"{self.path}: shard {shard} array {altered[0]}: checksum mismatch (file altered or damaged); "
                    "run `pipeline cache verify --repair` and rebuild the damaged shards"
                )
        # Every read, not only verify's: a shard that passes its checksum can still hold NaN or
        # out-of-range classes (written so, or forged with a matching record); training on it
        # would give NaN weights or an index error, so it is refused as verify refuses it.
        invalid = target_problems(data["topk_index"], data["topk_prob"], self.num_classes)
        if invalid:
            raise CacheError(
                f"{self.path}: shard {shard} (images {start}..{stop - 1}): {invalid[0]}; run `pipeline cache verify "
                f"--repair {self.path}`, then rerun the command that wrote the cache (e.g. `pipeline teacher-cache`, "
                "same arguments) to recompute it"
            )
        self._shards[shard] = data
        self._cached_bytes += sum(a.nbytes for a in data.values())
        while len(self._shards) > 1 and (len(self._shards) > self._max_cached or self._cached_bytes > MAX_CACHED_BYTES):
            _, evicted = self._shards.popitem(last=False)
            self._cached_bytes -= sum(a.nbytes for a in evicted.values())
        return data

    def gather(self, image_ids, crop_ids) -> dict[str, np.ndarray]:
        """Rows for (image_id, crop_id) pairs, in the order given."""
        crop_ids = np.asarray(crop_ids, dtype=np.int64)
        if crop_ids.size and (crop_ids.min() < 0 or crop_ids.max() >= self.num_crops):
            raise CacheError(f"{self.path}: crop index out of range 0..{self.num_crops - 1}")
        return self._collect(image_ids, 2, lambda array, rows, sel: array[rows, crop_ids[sel]])

    def images(self, image_ids) -> dict[str, np.ndarray]:
        """Every crop of the given images, in the order given: arrays [len(image_ids), C, ...]."""
        return self._collect(image_ids, 1, lambda array, rows, sel: array[rows])

    def _collect(self, image_ids, dims_picked: int, pick) -> dict[str, np.ndarray]:
        """Per data array, ``pick(shard array, rows in the shard, positions in image_ids)`` placed at those
        positions; each array's shape less its first ``dims_picked`` axes follows. One sort (O(n log n))."""
        image_ids = np.asarray(image_ids, dtype=np.int64)
        if image_ids.size and (image_ids.min() < 0 or image_ids.max() >= self.num_images):
            raise CacheError(f"{self.path}: image id out of range 0..{self.num_images - 1}")
        specs = self.layout.array_specs()
        out = {name: np.empty((len(image_ids), *specs[name][0][dims_picked:]), specs[name][2]) for name in DATA_ARRAYS}
        ips = self.layout.images_per_shard
        shard_ids = image_ids // ips
        order = np.argsort(shard_ids, kind="stable")
        shards, starts = np.unique(shard_ids[order], return_index=True)
        for s, sel in zip(shards, np.split(order, starts[1:])):
            data, rows = self.read_shard(int(s)), image_ids[sel] - s * ips
            for name in DATA_ARRAYS:
                out[name][sel] = pick(data[name], rows, sel)
        return out


def _shard_problems(reader: CacheReader, shard: int) -> list[str]:
    """Problems of one shard that claims to be complete: unreadable, altered or impossible data."""
    L, record = reader.layout, reader.records[shard]
    start, stop = shard_bounds(shard, L.images_per_shard, L.num_images)
    problems, sound = [], {}
    for j, name in enumerate(DATA_ARRAYS):
        try:
            data = np.asarray(reader.arrays[name][start:stop])
        except Exception as e:
            problems.append(f"shard {shard} array {name}: unreadable ({type(e).__name__}: {str(e)[:120]})")
            continue
        if _checksum(data) != record[1 + j]:
            problems.append(f"shard {shard} array {name}: checksum mismatch (file altered or damaged)")
            continue
        sound[name] = data
    problems += [f"shard {shard}: {p}" for p in target_problems(sound.get("topk_index"), sound.get("topk_prob"),
                                                                  L.num_classes)]
    return problems


# verify lists incomplete shards one by one up to this many, then summarises (a forged shard count
# must not become a million lines)
LISTED_INCOMPLETE = 20


def _scan(path: str | Path, manifest_hash: str | None, manifest_images: int | None = None,
          report_unopenable: bool = True) -> tuple[list[str], list[int]]:
    """(every problem, the complete shards that are damaged). Per-shard work is over the shards
    with a record on disk; the others are incomplete, summarised past LISTED_INCOMPLETE."""
    try:
        reader = CacheReader(path, manifest_hash=manifest_hash, manifest_images=manifest_images,
                             require_complete=False, _report_unreadable_records=True)
    except CacheError as e:
        if not report_unopenable:
            raise
        return [str(e)], []
    L = reader.layout
    problems: dict[int, list[str]] = {}
    damaged = []
    for s, why in reader.unreadable_records.items():  # --repair rewrites it as "incomplete"
        problems[s] = [f"shard {s}: completion record unreadable ({why})"]
        damaged.append(s)
    incomplete = np.flatnonzero(~reader.complete)
    incomplete = incomplete[~np.isin(incomplete, damaged)]
    for s in incomplete[:LISTED_INCOMPLETE].tolist():
        start, stop = shard_bounds(s, L.images_per_shard, L.num_images)
        problems[s] = [f"shard {s} (images {start}..{stop - 1}): incomplete (no completion record)"]
    for s in np.flatnonzero(reader.complete).tolist():
        if found := _shard_problems(reader, s):
            problems[s] = found
            damaged.append(s)
    listed = [p for s in sorted(problems) for p in problems[s]]
    if len(incomplete) > LISTED_INCOMPLETE:
        listed.append(f"{len(incomplete) - LISTED_INCOMPLETE:,} more incomplete shards (of {L.num_shards:,}; "
                      f"{int(reader.complete.sum()):,} complete), e.g. shard {incomplete[LISTED_INCOMPLETE]}")
    return listed, sorted(damaged)


def verify_cache(path: str | Path, manifest_hash: str | None = None, manifest_images: int | None = None,
                 report_unopenable: bool = True) -> list[str]:
    """Every problem found (empty list = sound): format, layout, completeness, checksums, mass.
    A cache that cannot be opened at all is one problem, or (``report_unopenable=False``) its CacheError."""
    return _scan(path, manifest_hash, manifest_images, report_unopenable)[0]


def repair_cache(path: str | Path, manifest_hash: str | None = None, manifest_images: int | None = None,
                 report_unopenable: bool = True) -> tuple[list[str], list[int]]:
    """Reset the completion record of every damaged shard, so that rerunning the command that
    wrote the cache recomputes exactly those shards. Returns (problems, shards reset).

    Not while a writer runs: it could be writing the records being reset.
    """
    problems, damaged = _scan(path, manifest_hash, manifest_images, report_unopenable)
    if damaged:
        records = _open_group(path, mode="r+")[RECORD_ARRAY]
        for s in damaged:
            records[s : s + 1] = np.zeros((1, records.shape[1]), dtype=np.uint32)
    return problems, damaged
