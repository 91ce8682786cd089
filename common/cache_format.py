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
"""
from __future__ import annotations

import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

FORMAT_NAME = "meal-v2-teacher-cache"
FORMAT_VERSION = 1
TOOL_VERSION = "0.1.0"
DATA_ARRAYS = ("boxes", "flip", "topk_index", "topk_prob")
RECORD_ARRAY = "shard_record"

# Attributes that must agree for two runs to write into one cache.
IDENTITY_KEYS = ("manifest", "num_classes", "teachers", "ensemble", "crops", "storage")


class CacheError(ValueError):
    """The cache is missing, incomplete, damaged or does not match its inputs."""


def index_dtype(num_classes: int) -> np.dtype:
    return np.dtype(np.uint16) if num_classes <= 65535 else np.dtype(np.int32)


def shard_bounds(shard: int, images_per_shard: int, num_images: int) -> tuple[int, int]:
    start = shard * images_per_shard
    return start, min(start + images_per_shard, num_images)


def _checksum(a: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(a).view(np.uint8).tobytes()) & 0xFFFFFFFF


def _open_group(path: str | Path, mode: str) -> zarr.Group:
    return zarr.open_group(store=str(path), mode=mode, zarr_format=3)


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


class CacheWriter:
    """Creates a cache (or reopens a compatible one) and writes whole shards."""

    def __init__(self, path: str | Path, attrs: dict[str, Any]):
        self.path = str(path)
        wanted = dict(attrs, format=FORMAT_NAME, version=FORMAT_VERSION, tool_version=TOOL_VERSION)
        self.layout = CacheLayout.from_attrs(wanted)
        try:
            group = _open_group(self.path, mode="w-")
            created = True
        except (FileExistsError, zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayError):
            created = False
        if created:
            self._create(group, wanted)
        group = _open_group(self.path, mode="r+")
        found = dict(group.attrs)
        if not found:
            raise CacheError(
                f"{self.path}: exists but has no cache attributes (another writer may be creating it; "
                "otherwise delete the directory and rerun)"
            )
        _check_format(found, self.path)
        diffs = describe_difference(found, wanted)
        if diffs:
            raise CacheError(
                f"{self.path}: refusing to add to a cache built with different inputs:\n  - "
                + "\n  - ".join(diffs)
                + "\nWrite to a new --out directory, or rerun with the settings the cache was built with."
            )
        self.group = group
        self.attrs = found
        self.arrays = {name: group[name] for name in (*DATA_ARRAYS, RECORD_ARRAY)}

    def _create(self, group: zarr.Group, attrs: dict[str, Any]) -> None:
        L = self.layout
        S, n = L.num_shards, min(L.images_per_shard, max(1, L.num_images))
        compressors = [ZstdCodec(level=3), Crc32cCodec()]
        specs = {
            "boxes": ((L.num_images, L.num_crops, 4), (n, L.num_crops, 4), np.int32),
            "flip": ((L.num_images, L.num_crops), (n, L.num_crops), np.uint8),
            "topk_index": ((L.num_images, L.num_crops, L.topk), (n, L.num_crops, L.topk), index_dtype(L.num_classes)),
            "topk_prob": ((L.num_images, L.num_crops, L.topk), (n, L.num_crops, L.topk), np.float16),
            RECORD_ARRAY: ((S, 1 + len(DATA_ARRAYS)), (1, 1 + len(DATA_ARRAYS)), np.uint32),
        }
        for name, (shape, chunks, dtype) in specs.items():
            group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=0, compressors=compressors)
        # Attributes last: a group without them is recognisably unfinished.
        group.attrs.update(attrs)

    def shard_range(self, shard: int) -> tuple[int, int]:
        return shard_bounds(shard, self.layout.images_per_shard, self.layout.num_images)

    def complete_shards(self) -> np.ndarray:
        """Boolean mask of shards whose completion record is written."""
        return _read_records(self.arrays[RECORD_ARRAY])[:, 0] == 1

    def write_shard(self, shard: int, boxes: np.ndarray, flip: np.ndarray, topk_index: np.ndarray, topk_prob: np.ndarray) -> None:
        """Write one whole shard, then its completion record (the commit point)."""
        start, stop = self.shard_range(shard)
        L, n = self.layout, stop - start
        data = {
            "boxes": np.asarray(boxes, dtype=np.int32).reshape(n, L.num_crops, 4),
            "flip": np.asarray(flip, dtype=np.uint8).reshape(n, L.num_crops),
            "topk_index": np.asarray(topk_index).astype(index_dtype(L.num_classes)).reshape(n, L.num_crops, L.topk),
            "topk_prob": np.asarray(topk_prob, dtype=np.float16).reshape(n, L.num_crops, L.topk),
        }
        for name in DATA_ARRAYS:
            self.arrays[name][start:stop] = data[name]
        record = np.array([[1, *(_checksum(data[name]) for name in DATA_ARRAYS)]], dtype=np.uint32)
        self.arrays[RECORD_ARRAY][shard : shard + 1] = record


def _read_records(arr) -> np.ndarray:
    """Shard records; a damaged record chunk reads as 'incomplete'."""
    try:
        return np.asarray(arr[:])
    except Exception:
        rows = []
        for s in range(arr.shape[0]):
            try:
                rows.append(np.asarray(arr[s : s + 1])[0])
            except Exception:
                rows.append(np.zeros(arr.shape[1], dtype=np.uint32))
        return np.stack(rows)


class CacheReader:
    """Read access for stage 2 and tools; refuses caches that do not match.

    Shards are read whole and kept in a small LRU, which matches how Zarr
    stores them (one chunk per shard) and bounds memory for any dataset size.
    """

    def __init__(
        self,
        path: str | Path,
        manifest_hash: str | None = None,
        num_classes: int | None = None,
        require_complete: bool = True,
        max_cached_shards: int = 64,
    ):
        self.path = str(path)
        if "://" not in self.path and not Path(self.path).exists():
            raise CacheError(f"teacher cache {self.path} does not exist; build it with `pipeline teacher-cache`")
        try:
            group = _open_group(self.path, mode="r")
        except Exception as e:
            raise CacheError(f"{self.path}: not a readable Zarr v3 teacher cache ({type(e).__name__}: {e})") from None
        self.attrs = dict(group.attrs)
        _check_format(self.attrs, self.path)
        self.layout = CacheLayout.from_attrs(self.attrs)
        self.arrays = {name: group[name] for name in (*DATA_ARRAYS, RECORD_ARRAY)}
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
        self.complete = _read_records(self.arrays[RECORD_ARRAY])[:, 0] == 1
        if require_complete and not self.complete.all():
            missing = np.flatnonzero(~self.complete)
            raise CacheError(
                f"{self.path}: {len(missing)} of {len(self.complete)} shards are incomplete "
                f"(e.g. shard {missing[:5].tolist()}); rerun the same `pipeline teacher-cache` command to finish it"
            )
        self._shards: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self._max_cached = max_cached_shards

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
                f"{self.path}: shard {shard} (images {start}..{stop - 1}) is damaged ({type(e).__name__}: {e}); "
                "run `pipeline cache verify` and rebuild the damaged shards"
            ) from None
        self._shards[shard] = data
        if len(self._shards) > self._max_cached:
            self._shards.popitem(last=False)
        return data

    def gather(self, image_ids, crop_ids) -> dict[str, np.ndarray]:
        """Rows for (image_id, crop_id) pairs, in the order given."""
        image_ids = np.asarray(image_ids, dtype=np.int64)
        crop_ids = np.asarray(crop_ids, dtype=np.int64)
        if image_ids.size and (image_ids.min() < 0 or image_ids.max() >= self.num_images):
            raise CacheError(f"{self.path}: image id out of range 0..{self.num_images - 1}")
        if crop_ids.size and (crop_ids.min() < 0 or crop_ids.max() >= self.num_crops):
            raise CacheError(f"{self.path}: crop index out of range 0..{self.num_crops - 1}")
        ips = self.layout.images_per_shard
        shard_ids = image_ids // ips
        out = {
            "boxes": np.empty((len(image_ids), 4), np.int32),
            "flip": np.empty(len(image_ids), np.uint8),
            "topk_index": np.empty((len(image_ids), self.topk), index_dtype(self.num_classes)),
            "topk_prob": np.empty((len(image_ids), self.topk), np.float16),
        }
        # Group by shard with one sort (O(n log n)), not one scan per shard.
        order = np.argsort(shard_ids, kind="stable")
        shards, starts = np.unique(shard_ids[order], return_index=True)
        for s, sel in zip(shards, np.split(order, starts[1:])):
            data = self.read_shard(int(s))
            rows, cols = image_ids[sel] - s * ips, crop_ids[sel]
            for name in DATA_ARRAYS:
                out[name][sel] = data[name][rows, cols]
        return out


def restore_targets(topk_index, topk_prob, num_classes: int, device=None) -> torch.Tensor:
    """Dense (B, num_classes) float32 targets from stored top-k.

    The mass the top-k did not keep (1 - sum) is spread uniformly over the
    other classes (the cache's ``storage.residual = "uniform"``), so every row
    sums to 1 and no class gets zero probability unless k = num_classes.
    """
    idx = torch.as_tensor(np.asarray(topk_index).astype(np.int64), device=device)
    prob = torch.as_tensor(np.asarray(topk_prob), device=device).float().clamp_min_(0)
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


def verify_cache(path: str | Path, manifest_hash: str | None = None) -> list[str]:
    """Every problem found (empty list = sound): format, completeness, checksums, mass."""
    problems: list[str] = []
    try:
        reader = CacheReader(path, manifest_hash=manifest_hash, require_complete=False)
    except CacheError as e:
        return [str(e)]
    L = reader.layout
    for name, shape in (
        ("boxes", (L.num_images, L.num_crops, 4)),
        ("flip", (L.num_images, L.num_crops)),
        ("topk_index", (L.num_images, L.num_crops, L.topk)),
        ("topk_prob", (L.num_images, L.num_crops, L.topk)),
        (RECORD_ARRAY, (L.num_shards, 1 + len(DATA_ARRAYS))),
    ):
        if tuple(reader.arrays[name].shape) != shape:
            problems.append(f"array {name}: shape {tuple(reader.arrays[name].shape)}, expected {shape}")
    if problems:
        return problems
    records = _read_records(reader.arrays[RECORD_ARRAY])
    for s in range(L.num_shards):
        start, stop = shard_bounds(s, L.images_per_shard, L.num_images)
        if records[s, 0] != 1:
            problems.append(f"shard {s} (images {start}..{stop - 1}): incomplete (no completion record)")
            continue
        for j, name in enumerate(DATA_ARRAYS):
            try:
                data = np.asarray(reader.arrays[name][start:stop])
            except Exception as e:
                problems.append(f"shard {s} array {name}: unreadable ({type(e).__name__}: {str(e)[:120]})")
                continue
            if _checksum(data) != records[s, 1 + j]:
                problems.append(f"shard {s} array {name}: checksum mismatch (file altered or damaged)")
                continue
            if name == "topk_prob":
                mass = data.astype(np.float32).sum(-1)
                if (data < 0).any() or (mass > 1.0 + 1e-2).any() or not np.isfinite(mass).all():
                    problems.append(f"shard {s}: probability mass outside [0, 1]")
            if name == "topk_index" and (data.astype(np.int64) >= L.num_classes).any():
                problems.append(f"shard {s}: class index >= num_classes ({L.num_classes})")
    return problems
