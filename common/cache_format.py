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
crop policy, storage, tool version and the resolved config.

A cache can grow to more crops per image (stage1_teacher_cache/grow.py): while
it does, its attributes carry a ``growing`` marker and readers refuse it; after,
it is an ordinary cache with the new crop count and a ``grown`` history.

A cache location is a local directory, a ``file://`` URL (opened as a local
directory) or any other fsspec URL (``s3://``, ``gs://``, ``memory://``...).
Opening a cache from a stranger is bounded: its JSON metadata has a size limit,
and its arrays must have exactly the shapes, chunks, dtypes and codecs this
module writes, so no read allocates more than one shard.
"""
from __future__ import annotations

import errno
import os
import shutil
import threading
import uuid
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from common.errors import PipelineError, cause_text
from common.locations import filesystem, local_path
from common.runtime import to_device

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
ALLOWED_CODECS = frozenset({"bytes", "zstd", "crc32c"})  # what CacheWriter writes


class CacheError(PipelineError):
    """The cache is missing, incomplete, damaged or does not match its inputs."""


def index_dtype(num_classes: int) -> np.dtype:
    return np.dtype(np.uint16) if num_classes <= 65535 else np.dtype(np.int32)


def shard_bounds(shard: int, images_per_shard: int, num_images: int) -> tuple[int, int]:
    start = shard * images_per_shard
    return start, min(start + images_per_shard, num_images)


def _checksum(a: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(a).view(np.uint8).tobytes()) & 0xFFFFFFFF


def _store(location: str | Path) -> Path | str:
    """What zarr opens. file:// URLs become paths on purpose: zarr's LocalStore writes every
    file atomically (temp + rename), fsspec's local filesystem writes in place, so a kill
    could leave a torn chunk behind a completion record."""
    path = local_path(location)
    if path is not None:
        return path
    filesystem(location)  # a missing backend (s3fs, gcsfs) fails here with the extra to install
    return str(location)


def _open_group(path: str | Path, mode: str) -> zarr.Group:
    return zarr.open_group(store=_store(path), mode=mode, zarr_format=3)


def _metadata_size(location: str | Path, key: str) -> int | None:
    """Size of one metadata file of the store, None if absent."""
    path = local_path(location)
    if path is not None:
        target = path / key
        return target.stat().st_size if target.is_file() else None
    fs, root = filesystem(location)
    try:
        return int(fs.size(f"{root.rstrip('/')}/{key}"))
    except FileNotFoundError:
        return None


def _check_metadata_sizes(location: str | Path) -> None:
    """Refuse oversized JSON before zarr parses it (a forged zarr.json could exhaust memory)."""
    for name in ("", *DATA_ARRAYS, RECORD_ARRAY):
        key = f"{name}/zarr.json" if name else "zarr.json"
        size = _metadata_size(location, key)
        if size is not None and size > MAX_METADATA_BYTES:
            raise CacheError(
                f"{location}: {key} is {size:,} bytes, over the {MAX_METADATA_BYTES:,}-byte limit for cache "
                "metadata; this is not a cache written by this tool"
            )


def describe_difference(found: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Human-readable list of identity attributes that differ."""
    diffs = []
    for key in IDENTITY_KEYS:
        if found.get(key) != wanted.get(key):
            diffs.append(f"{key}: cache has {found.get(key)!r}, this run has {wanted.get(key)!r}")
    return diffs


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
    def from_attrs(cls, attrs: dict[str, Any]) -> "CacheLayout":
        return cls(
            num_images=int(attrs["manifest"]["num_images"]),
            num_crops=int(attrs["crops"]["num_crops"]),
            topk=int(attrs["storage"]["k"]),
            num_classes=int(attrs["num_classes"]),
            images_per_shard=int(attrs["storage"]["images_per_shard"]),
        )

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


def _layout(attrs: dict[str, Any], path: str | Path) -> CacheLayout:
    """The layout the attributes promise, refusing malformed or absurd values."""
    try:
        layout = CacheLayout.from_attrs(attrs)
    except (KeyError, TypeError, ValueError) as e:
        raise CacheError(f"{path}: malformed cache attributes ({type(e).__name__}: {e})") from e
    L = layout
    if L.num_images < 0 or L.num_crops < 1 or L.images_per_shard < 1 or not 1 <= L.topk <= L.num_classes:
        raise CacheError(
            f"{path}: impossible layout in the attributes ({L.num_images} images, {L.num_crops} crops, "
            f"k {L.topk} of {L.num_classes} classes, {L.images_per_shard} images per shard)"
        )
    chunk_bytes = L.images_per_shard * L.num_crops * max(4, L.topk) * 4
    if chunk_bytes > MAX_CHUNK_BYTES:
        raise CacheError(f"{path}: a shard would decode to {chunk_bytes:,} bytes, over the {MAX_CHUNK_BYTES:,} limit")
    return layout


def _check_arrays(group: zarr.Group, layout: CacheLayout, path: str | Path) -> dict[str, Any]:
    """The arrays, if each has exactly the shape, chunking, dtype and codecs the layout implies."""
    arrays = {}
    for name, (shape, chunks, dtype) in layout.array_specs().items():
        try:
            arr = group[name]
        except KeyError:
            raise CacheError(f"{path}: array {name} is missing") from None
        found = (tuple(arr.shape), tuple(arr.chunks), np.dtype(arr.dtype))
        if found != (shape, chunks, dtype):
            raise CacheError(
                f"{path}: array {name} has shape {found[0]}, chunks {found[1]}, dtype {found[2]}; "
                f"the attributes imply {shape}, {chunks}, {dtype}"
            )
        codecs = {codec.to_dict()["name"] for codec in arr.metadata.codecs}
        if not codecs <= ALLOWED_CODECS:
            raise CacheError(f"{path}: array {name} uses codecs {sorted(codecs - ALLOWED_CODECS)}, "
                             f"which this tool never writes (it writes {sorted(ALLOWED_CODECS)})")
        arrays[name] = arr
    return arrays


def _check_format(attrs: dict[str, Any], path: str | Path) -> None:
    fmt, ver = attrs.get("format"), attrs.get("version")
    if fmt != FORMAT_NAME:
        raise CacheError(f"{path}: not a teacher cache (format attribute is {fmt!r}, expected {FORMAT_NAME!r})")
    if not isinstance(ver, int) or ver > FORMAT_VERSION:
        raise CacheError(
            f"{path}: cache format version {ver!r} is newer than this tool reads (v{FORMAT_VERSION}); "
            "upgrade the pipeline package to read it"
        )
    if ver < FORMAT_VERSION:
        raise CacheError(f"{path}: cache format version {ver} is older than v{FORMAT_VERSION}; rebuild the cache")


def _check_not_growing(attrs: dict[str, Any], path: str | Path) -> None:
    """A cache mid-grow (stage1_teacher_cache/grow.py) is neither its old self nor the grown one yet."""
    marker = attrs.get("growing")
    if marker:
        more = int(marker.get("to_crops", 0)) - int(marker.get("from_crops", 0))
        raise CacheError(
            f"{path}: is being grown from {marker.get('from_crops')} to {marker.get('to_crops')} crops per image "
            f"(started {marker.get('started_at')}) and cannot be used until that finishes; rerun the same "
            f"`pipeline teacher-cache ... --more-crops {more}` command to finish it (or drop it: "
            f"`pipeline cache abandon-growth {path}`)"
        )


def open_attrs(path: str | Path) -> dict[str, Any]:
    """The group attributes at ``path``; {} where there is no group (or one without attributes)."""
    local = local_path(path)
    if local is not None and not (local / "zarr.json").is_file():
        return {}
    try:
        _check_metadata_sizes(path)
        return dict(_open_group(path, mode="r").attrs)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        return {}


def put_attrs(path: str | Path, attrs: dict[str, Any]) -> None:
    """Replace every attribute in one metadata write (atomic on local disks: zarr writes temp + rename)."""
    _open_group(path, mode="r+").attrs.put(attrs)


class CacheWriter:
    """Creates a cache (or reopens a compatible one) and writes whole shards."""

    def __init__(self, path: str | Path, attrs: dict[str, Any]):
        self.path = str(path)
        wanted = dict(attrs, format=FORMAT_NAME, version=FORMAT_VERSION, tool_version=TOOL_VERSION)
        self.layout = _layout(wanted, self.path)
        local = local_path(self.path)
        if local is None:
            self._create_remote(wanted)
        elif not (local.exists() and any(local.iterdir())):
            self._create_local(local, wanted)
        group = _open_group(self.path, mode="r+")
        found = dict(group.attrs)
        if not found:
            raise CacheError(
                f"{self.path}: exists but has no cache attributes (another writer may be creating it, or a "
                "creation was interrupted; if no other run is writing it, delete it and rerun)"
            )
        _check_format(found, self.path)
        _check_not_growing(found, self.path)
        diffs = describe_difference(found, wanted)
        if diffs:
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
        except OSError as e:
            raise CacheError(_write_failure(self.path, shard, e)) from e


def _write_failure(path: str, shard: int, e: OSError) -> str:
    """A failed write leaves the shard's record unset (written last, and atomically on local disks)."""
    full = e.errno in (errno.ENOSPC, errno.EDQUOT)
    return (
        f"{path}: writing shard {shard} failed: {e.strerror or e}"
        + (" (disk full or quota exceeded)" if full else "")
        + f"; shard {shard} is not marked complete and the shards before it are kept. "
        + ("Free some space, then rerun" if full else "Fix the cause, then rerun")
        + " the same command to resume."
    )


def round_down_fp16(prob) -> np.ndarray:
    """float16 probabilities rounded toward zero.

    Round-to-nearest can push the stored top-k mass to >= 1, which would leave
    no residual for the other classes; rounding down keeps sum(topk) <= the
    true mass, so restored targets give every class a share (when k < K).
    """
    prob = np.asarray(prob)
    if prob.dtype == np.float16:
        return prob
    p32 = prob.astype(np.float32)
    p16 = p32.astype(np.float16)
    over = p16.astype(np.float32) > p32
    p16[over] = np.nextafter(p16[over], np.float16(0))
    return p16


def _read_records(arr, path: str) -> np.ndarray:
    """Shard records. "Incomplete" means a record that is absent (it reads as the fill value 0)
    or not marked done; a record that cannot be *read* is an error, never "incomplete": a
    transient object-store failure must stop the run, not make it recompute finished shards."""
    try:
        return np.asarray(arr[:])
    except Exception as e:
        unreadable = _unreadable_records(arr)[1]
        shards = f"shard(s) {sorted(unreadable)[:5]}" if unreadable else "the records"
        raise CacheError(
            f"{path}: cannot read the completion record of {shards} ({cause_text(e)}). If the storage failed "
            "for a moment, rerun; if `pipeline cache verify` reports the record damaged, "
            "`pipeline cache verify --repair` resets it so that the shard is recomputed"
        ) from e


def _unreadable_records(arr) -> tuple[np.ndarray, dict[int, str]]:
    """Records read one by one: (records with unreadable rows zeroed, {shard: why unreadable})."""
    rows, unreadable = [], {}
    for s in range(arr.shape[0]):
        try:
            rows.append(np.asarray(arr[s : s + 1])[0])
        except Exception as e:
            unreadable[s] = cause_text(e, 120)
            rows.append(np.zeros(arr.shape[1], dtype=np.uint32))
    return np.stack(rows), unreadable


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
        max_cached_shards: int = 64,
        verify_checksums: bool = False,
        _report_unreadable_records: bool = False,
        _while_growing: bool = False,
    ):
        self.path = str(path)
        local = local_path(self.path)
        if local is not None and not local.exists():
            raise CacheError(f"teacher cache {self.path} does not exist; build it with `pipeline teacher-cache`")
        try:
            _check_metadata_sizes(self.path)
            group = _open_group(self.path, mode="r")
        except CacheError:
            raise
        except Exception as e:
            raise CacheError(f"{self.path}: not a readable Zarr v3 teacher cache ({cause_text(e, 300)})") from e
        self.attrs = dict(group.attrs)
        _check_format(self.attrs, self.path)
        # Only the grower and `cache info` look inside a cache mid-grow, and only before its swap
        # (during it, its arrays and attributes disagree).
        if not _while_growing or (self.attrs.get("growing") or {}).get("phase") == "swapping":
            _check_not_growing(self.attrs, self.path)
        self.layout = _layout(self.attrs, self.path)
        self.arrays = _check_arrays(group, self.layout, self.path)
        if manifest_hash is not None and self.attrs["manifest"]["hash"] != manifest_hash:
            raise CacheError(
                f"{self.path}: built for manifest {self.attrs['manifest']['hash'][:16]}... "
                f"({self.attrs['manifest']['num_images']} images) but the given manifest is {manifest_hash[:16]}...; "
                "pass the manifest the cache was built from, or rebuild the cache for this manifest"
            )
        if num_classes is not None and self.layout.num_classes != num_classes:
            raise CacheError(
                f"{self.path}: cache has {self.layout.num_classes} classes but {num_classes} were expected; "
                "the student's class count must equal the teachers'"
            )
        # {shard: why its record is unreadable}; only `verify` asks for a report instead of an error
        self.unreadable_records: dict[int, str] = {}
        if _report_unreadable_records:
            self.records, self.unreadable_records = _unreadable_records(self.arrays[RECORD_ARRAY])
        else:
            self.records = _read_records(self.arrays[RECORD_ARRAY], self.path)
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

    @property
    def num_images(self) -> int:
        return self.layout.num_images

    @property
    def num_crops(self) -> int:
        return self.layout.num_crops

    @property
    def num_classes(self) -> int:
        return self.layout.num_classes

    @property
    def topk(self) -> int:
        return self.layout.topk

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
        self._shards[shard] = data
        self._cached_bytes += sum(a.nbytes for a in data.values())
        while len(self._shards) > 1 and (len(self._shards) > self._max_cached or self._cached_bytes > MAX_CACHED_BYTES):
            _, evicted = self._shards.popitem(last=False)
            self._cached_bytes -= sum(a.nbytes for a in evicted.values())
        return data

    def _by_shard(self, image_ids: np.ndarray) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]]:
        """(positions in image_ids, shard data, rows in the shard) per shard, one sort (O(n log n))."""
        if image_ids.size and (image_ids.min() < 0 or image_ids.max() >= self.num_images):
            raise CacheError(f"{self.path}: image id out of range 0..{self.num_images - 1}")
        ips = self.layout.images_per_shard
        shard_ids = image_ids // ips
        order = np.argsort(shard_ids, kind="stable")
        shards, starts = np.unique(shard_ids[order], return_index=True)
        for s, sel in zip(shards, np.split(order, starts[1:])):
            yield sel, self.read_shard(int(s)), image_ids[sel] - s * ips

    def gather(self, image_ids, crop_ids) -> dict[str, np.ndarray]:
        """Rows for (image_id, crop_id) pairs, in the order given."""
        image_ids = np.asarray(image_ids, dtype=np.int64)
        crop_ids = np.asarray(crop_ids, dtype=np.int64)
        if crop_ids.size and (crop_ids.min() < 0 or crop_ids.max() >= self.num_crops):
            raise CacheError(f"{self.path}: crop index out of range 0..{self.num_crops - 1}")
        out = {
            "boxes": np.empty((len(image_ids), 4), np.int32),
            "flip": np.empty(len(image_ids), np.uint8),
            "topk_index": np.empty((len(image_ids), self.topk), index_dtype(self.num_classes)),
            "topk_prob": np.empty((len(image_ids), self.topk), np.float16),
        }
        for sel, data, rows in self._by_shard(image_ids):
            for name in DATA_ARRAYS:
                out[name][sel] = data[name][rows, crop_ids[sel]]
        return out

    def images(self, image_ids) -> dict[str, np.ndarray]:
        """Every crop of the given images, in the order given: arrays [len(image_ids), C, ...]."""
        image_ids = np.asarray(image_ids, dtype=np.int64)
        specs = self.layout.array_specs()
        out = {name: np.empty((len(image_ids), *specs[name][0][1:]), specs[name][2]) for name in DATA_ARRAYS}
        for sel, data, rows in self._by_shard(image_ids):
            for name in DATA_ARRAYS:
                out[name][sel] = data[name][rows]
        return out


def restore_targets(topk_index, topk_prob, num_classes: int, device=None) -> torch.Tensor:
    """Dense (B, num_classes) float32 targets from stored top-k.

    The mass the top-k did not keep (1 - sum) is spread uniformly over the
    other classes (the cache's ``storage.residual = "uniform"``), so every row
    sums to 1 and no class gets zero probability unless k = num_classes.
    """
    idx = to_device(torch.from_numpy(np.asarray(topk_index).astype(np.int64)), device)
    prob = to_device(torch.from_numpy(np.asarray(topk_prob).astype(np.float32)), device).clamp_min_(0)
    k = idx.shape[-1]
    kept = prob.sum(-1, keepdim=True)
    if k < num_classes:
        residual = (1.0 - kept).clamp_min(0) / (num_classes - k)
        dense = residual.expand(*idx.shape[:-1], num_classes).clone()
    else:
        prob = prob / kept.clamp_min(1e-12)
        dense = torch.zeros(*idx.shape[:-1], num_classes, device=idx.device)
    dense.scatter_(-1, idx, prob)
    # fp16 rounding can leave the sum a hair off 1; KL wants an exact distribution.
    return dense / dense.sum(-1, keepdim=True)


def _shard_problems(reader: CacheReader, shard: int) -> list[str]:
    """Problems of one shard that claims to be complete: unreadable, altered or impossible data."""
    L, record = reader.layout, reader.records[shard]
    start, stop = shard_bounds(shard, L.images_per_shard, L.num_images)
    problems = []
    for j, name in enumerate(DATA_ARRAYS):
        try:
            data = np.asarray(reader.arrays[name][start:stop])
        except Exception as e:
            problems.append(f"shard {shard} array {name}: unreadable ({type(e).__name__}: {str(e)[:120]})")
            continue
        if _checksum(data) != record[1 + j]:
            problems.append(f"shard {shard} array {name}: checksum mismatch (file altered or damaged)")
            continue
        if name == "topk_prob":
            mass = data.astype(np.float32).sum(-1)
            if (data < 0).any() or (mass > 1.0 + 1e-2).any() or not np.isfinite(mass).all():
                problems.append(f"shard {shard}: probability mass outside [0, 1]")
        if name == "topk_index" and (data.astype(np.int64) >= L.num_classes).any():
            problems.append(f"shard {shard}: class index >= num_classes ({L.num_classes})")
    return problems


def _scan(path: str | Path, manifest_hash: str | None) -> tuple[list[str], list[int]]:
    """(every problem, the complete shards that are damaged)."""
    try:
        reader = CacheReader(path, manifest_hash=manifest_hash, require_complete=False, _report_unreadable_records=True)
    except CacheError as e:
        return [str(e)], []
    problems, damaged = [], []
    L = reader.layout
    for s in range(L.num_shards):
        if s in reader.unreadable_records:  # --repair rewrites it as "incomplete"
            problems.append(f"shard {s}: completion record unreadable ({reader.unreadable_records[s]})")
            damaged.append(s)
            continue
        if not reader.complete[s]:
            start, stop = shard_bounds(s, L.images_per_shard, L.num_images)
            problems.append(f"shard {s} (images {start}..{stop - 1}): incomplete (no completion record)")
            continue
        found = _shard_problems(reader, s)
        problems += found
        if found:
            damaged.append(s)
    return problems, damaged


def verify_cache(path: str | Path, manifest_hash: str | None = None) -> list[str]:
    """Every problem found (empty list = sound): format, layout, completeness, checksums, mass."""
    return _scan(path, manifest_hash)[0]


def repair_cache(path: str | Path, manifest_hash: str | None = None) -> tuple[list[str], list[int]]:
    """Reset the completion record of every damaged shard, so that rerunning the command that
    wrote the cache recomputes exactly those shards. Returns (problems, shards reset).

    Not while a writer runs: it could be writing the records being reset.
    """
    problems, damaged = _scan(path, manifest_hash)
    if damaged:
        records = _open_group(path, mode="r+")[RECORD_ARRAY]
        for s in damaged:
            records[s : s + 1] = np.zeros((1, records.shape[1]), dtype=np.uint32)
    return problems, damaged
