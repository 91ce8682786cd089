"""`pipeline teacher-cache --more-crops N`: append crops C..C+N-1 to a complete C-crop cache.

The data arrays are chunked one shard per chunk with the whole crop axis in it,
so C+N crops need new chunks (n, C+N, ...): a grown cache is laid out exactly as
one built with C+N crops from scratch, and the per-shard records and CRCs keep
their meaning. The new cache is therefore built beside the old arrays, inside
the cache, as an ordinary C+N cache under ``grow/`` (the *staging* cache): each
shard is the old shard (read with its checksums verified) followed by the
teachers' targets for the N new seeded crops, written with the usual
record-last commit. A kill loses at most the shards in flight, and rerunning
the same command resumes.

When every staging shard is complete its arrays replace the old ones (one
directory rename per array locally; copy, then delete with the array's
``zarr.json`` first, on object stores), and the attributes are rewritten with
C+N crops and a ``grown`` entry. From the first step to the last the cache's
attributes carry a ``growing`` marker, so no reader serves it (neither as the
old cache, whose arrays are about to be replaced, nor as a C+N cache before it
is complete); every step is idempotent, so a rerun after a kill at any point
finishes the job.

With ``--num-crops C`` the target is absolute: C is the run's ``crops.num_crops``
(the command that built the cache) and the result has C+N crops, so rerunning
the same command after it finished finds C+N crops and only resumes as stage 1
would. Without it, C is read from the cache (``recorded_crops``): the same
command resumes an unfinished growth, but run again after it finished it grows
the cache by N more.
"""
from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from common.cache_format import (DATA_ARRAYS, RECORD_ARRAY, TOOL_VERSION, CacheError, CacheReader, CacheWriter,
                                 describe_difference, open_attrs, put_attrs, shard_bounds, verify_cache)
from common.cache_storage import cache_attrs, now_utc
from common.distributed import fail_together
from common.locations import filesystem, local_path
from common.runtime import Runtime

STAGING = "grow"  # the staging cache: a member group of the cache being grown

# (start, stop) -> boxes int32 [n, m, 4] and flips uint8 [n, m] of images start..stop-1
CropSource = Callable[[int, int], tuple[np.ndarray, np.ndarray]]
# (first crop index, number of crops) -> the seed's crops with those indices
SeededCrops = Callable[[int, int], CropSource]


def with_crops(attrs: dict[str, Any], num_crops: int) -> dict[str, Any]:
    """The run's attributes for a cache of ``num_crops`` crops per image."""
    return cache_attrs(attrs, num_crops=num_crops, stamp_created=False)


def staging_path(path: str) -> str:
    return f"{str(path).rstrip('/')}/{STAGING}"


@dataclass
class Growth:
    """What the shard loop of stage 1 needs: where shards go, the crops to render, how to write a shard.

    ``old`` is None when there is nothing to append (the cache already has the target count): then
    this is a plain stage-1 run on the target count, which also recomputes shards that
    ``cache verify --repair`` reset.
    """

    path: str
    writer: CacheWriter
    crop_boxes: CropSource
    crops_per_image: int  # crops rendered per image
    old: CacheReader | None
    from_crops: int
    to_crops: int

    def write_shard(self, shard: int, xywh: np.ndarray, flip: np.ndarray, index: np.ndarray, prob: np.ndarray) -> None:
        if self.old is None:
            self.writer.write_shard(shard, xywh, flip, index, prob)
            return
        start, stop = self.writer.shard_range(shard)
        n, m, k = stop - start, self.crops_per_image, self.writer.layout.topk
        old = self.old.images(np.arange(start, stop))  # checksums verified
        self.writer.write_shard(
            shard,
            np.concatenate([old["boxes"], xywh.reshape(n, m, 4)], axis=1),
            np.concatenate([old["flip"], flip.reshape(n, m)], axis=1),
            np.concatenate([old["topk_index"], index.reshape(n, m, k)], axis=1),
            np.concatenate([old["topk_prob"], prob.reshape(n, m, k)], axis=1),
        )

    def finish(self, runtime: Runtime) -> bool:
        """On the main rank, once every rank's shards are written: swap the arrays in. True if grown now."""
        if self.old is None or not runtime.is_main:
            return False
        missing = int((~self.writer.complete_shards()).sum())
        if missing:
            raise CacheError(f"{self.path}: {missing} shard(s) of the growth to {self.to_crops} crops are incomplete; "
                             "rerun the same command to finish them")
        swap_in(self.path)
        return True


def open_growth(path: str, attrs: dict[str, Any], more: int, runtime: Runtime, seeded: SeededCrops) -> Growth:
    """Check the cache may grow by ``more`` crops and bring it to the state where shards can be written.

    ``attrs`` are the run's cache attributes (its ``crops.num_crops`` is C). The main rank
    prepares (marks the cache, creates the staging cache, finishes a pending swap) before the
    others open it, and a refusal stops every rank.
    """
    with fail_together(runtime):
        if runtime.is_main:
            _prepare(path, attrs, more, seeded)
    C = int(attrs["crops"]["num_crops"])
    target = with_crops(attrs, C + more)
    if not open_attrs(path).get("growing"):  # already grown (now or by an earlier run)
        return Growth(path, CacheWriter(path, target), seeded(0, C + more), C + more, None, C, C + more)
    old = CacheReader(path, manifest_hash=attrs["manifest"]["hash"], verify_checksums=True, _while_growing=True)
    return Growth(path, CacheWriter(staging_path(path), target), seeded(C, more), more, old, C, C + more)


def recorded_crops(attrs: dict[str, Any]) -> int | None:
    """The crop count a cache's attributes record (without --num-crops, the C a `--more-crops` run grows from:
    the module docstring); None where they hold no whole number there."""
    crops = attrs.get("crops")
    count = crops.get("num_crops") if isinstance(crops, dict) else None
    return count if type(count) is int else None


def _prepare(path: str, attrs: dict[str, Any], more: int, seeded: SeededCrops) -> None:
    if more < 1:
        raise CacheError(f"--more-crops must be at least 1 (got {more})")
    C = int(attrs["crops"]["num_crops"])
    found = open_attrs(path)
    if not found:
        raise CacheError(f"{path}: no cache to grow there; build it first with `pipeline teacher-cache` "
                         f"(without --more-crops)")
    marker = found.get("growing")
    if marker:
        if (marker.get("from_crops"), marker.get("to_crops")) != (C, C + more):
            raise CacheError(
                f"{path}: is being grown from {marker.get('from_crops')} to {marker.get('to_crops')} crops per image; "
                f"finish that with --num-crops {marker.get('from_crops')} "
                f"--more-crops {marker.get('to_crops', 0) - marker.get('from_crops', 0)} (this run asks "
                f"{C} -> {C + more})")
        _refuse_other_inputs(path, found, with_crops(attrs, marker["from_crops"]))
        if marker.get("phase") == "swapping":
            swap_in(path)  # a run was killed while swapping: finish it
        else:
            CacheWriter(staging_path(path), with_crops(attrs, C + more))  # (re)created here, before other ranks
        return
    have = recorded_crops(found)
    if have is None:
        raise CacheError(f"{path}: its attributes record no whole-number crop count (crops.num_crops), so it cannot "
                         "be grown; grow only a cache that `pipeline teacher-cache` wrote, or rebuild this one")
    if have == C + more:
        _remove_staging(path)  # a run was killed after its last step: only the empty staging group is left
        print(f"note: {path} already has {C + more} crops per image; nothing to add", file=sys.stderr)
        return
    if have != C:
        raise CacheError(
            f"{path}: has {have} crops per image, but this run's crops.num_crops is {C} (so --more-crops {more} "
            f"asks for {C} -> {C + more}); pass --num-crops {have} to grow the cache from the crops it has")
    _refuse_other_inputs(path, found, attrs)
    for derived in ("merge", "subset"):
        if found.get(derived):
            raise CacheError(
                f"{path}: is a `cache {derived}` result, whose targets or crops the teachers cannot extend; grow "
                f"its source cache(s), then run `cache {derived}` again")
    _check_growable(path, attrs["manifest"]["hash"], seeded(0, C))
    _remove_staging(path)  # a staging cache from before a kill that preceded the marker is not trusted
    found["growing"] = {"from_crops": C, "to_crops": C + more, "phase": "computing",
                        "started_at": now_utc()}
    put_attrs(path, found)
    CacheWriter(staging_path(path), with_crops(attrs, C + more))  # created here, before other ranks open it


def _check_growable(path: str, manifest_hash: str, old_crops: CropSource) -> None:
    """Before the marker goes on: every old shard complete and intact (they are copied into the grown
    cache) and holding the seed's crops (which the new ones continue). Failures after this point are
    the resumable ones of stage 1 (a bad image, a full disk)."""
    problems = verify_cache(path, manifest_hash=manifest_hash)
    if problems:
        raise CacheError(f"{path}: cannot grow a cache with problems ({len(problems)}, e.g. {problems[0]}); finish or "
                         "repair it first (`pipeline cache verify --repair`, then the command that wrote it)")
    reader = CacheReader(path, manifest_hash=manifest_hash)
    for shard in range(reader.layout.num_shards):
        start, stop = shard_bounds(shard, reader.layout.images_per_shard, reader.num_images)
        boxes, flip = old_crops(start, stop)
        if not (np.array_equal(reader.arrays["boxes"][start:stop], boxes)
                and np.array_equal(reader.arrays["flip"][start:stop], flip)):
            raise CacheError(f"{path}: the stored crops of shard {shard} are not the ones its crops.seed draws, so "
                             "crops continuing that seed would not extend them; this cache cannot be grown")


def abandon(path: str) -> dict[str, Any]:
    """Drop an unfinished growth before its swap: the staging cache and the marker go, the cache is
    its old self again (its arrays were never touched). Returns the marker that was removed."""
    found = open_attrs(path)
    marker = found.get("growing")
    if not marker:
        raise CacheError(f"{path}: is not being grown; nothing to abandon")
    if marker.get("phase") == "swapping":
        raise CacheError(f"{path}: the growth to {marker.get('to_crops')} crops is already swapping its arrays in; "
                         "rerun the `teacher-cache --more-crops` command to finish it (it cannot be undone now)")
    _remove_staging(path)
    del found["growing"]
    put_attrs(path, found)
    return marker


def _refuse_other_inputs(path: str, found: dict[str, Any], wanted: dict[str, Any]) -> None:
    diffs = describe_difference(found, wanted)
    if diffs:
        raise CacheError(
            f"{path}: refusing to grow a cache built with different inputs:\n  - " + "\n  - ".join(diffs)
            + "\nGrow it with the teachers, manifest, crop and storage settings it was built with "
              "(`pipeline cache info` lists them).")


def swap_in(path: str) -> None:
    """Replace the cache's arrays with the complete staging cache's, then its attributes. Idempotent."""
    found = open_attrs(path)
    marker = found["growing"]
    if marker.get("phase") != "swapping":
        found["growing"] = dict(marker, phase="swapping")
        put_attrs(path, found)
    for name in (*DATA_ARRAYS, RECORD_ARRAY):
        _move_array(path, name)
    staged = open_attrs(staging_path(path))
    # label_agreement (of the old crops) is not inherited: the run recomputes it over all of them next
    grown = cache_attrs(
        found, crops=staged["crops"], stamp_created=False, tool_version=TOOL_VERSION,
        # --evaluate-teachers on the growing run
        **({"teacher_eval": staged["teacher_eval"]} if staged.get("teacher_eval") else {}),
        grown=[*(found.get("grown") or []), {
            "from_crops": marker["from_crops"], "to_crops": marker["to_crops"], "started_at": marker.get("started_at"),
            "finished_at": now_utc(), "tool_version": TOOL_VERSION,
            "compute": staged.get("compute"), "config": staged.get("config")}])
    # The cache is well-formed again (arrays and attributes agree), so only now are readers let in.
    put_attrs(path, grown)
    _remove_staging(path)


def _move_array(path: str, name: str) -> None:
    """Move staging array ``name`` over the cache's; a staging array counts as there while its zarr.json is."""
    local = local_path(path)
    if local is not None:
        src, dst, trash = local / STAGING / name, local / name, local / f".{name}.replaced"
        if not (src / "zarr.json").exists():
            return
        shutil.rmtree(trash, ignore_errors=True)
        if dst.exists():
            os.rename(dst, trash)
        os.rename(src, dst)  # atomic: the array is either the old or the new one
        shutil.rmtree(trash, ignore_errors=True)
        return
    fs, root = filesystem(path)
    root = root.rstrip("/")
    src, dst = f"{root}/{STAGING}/{name}", f"{root}/{name}"
    if not fs.exists(f"{src}/zarr.json"):
        return
    if fs.exists(dst):
        fs.rm(dst, recursive=True)
    fs.copy(src, dst, recursive=True)
    fs.rm(f"{src}/zarr.json")  # the move is done: from here a rerun does not copy again
    fs.rm(src, recursive=True)


def _remove_staging(path: str) -> None:
    local = local_path(path)
    if local is not None:
        shutil.rmtree(local / STAGING, ignore_errors=True)
        for creating in local.glob(f".{STAGING}.creating-*"):  # a kill while the staging cache was created
            shutil.rmtree(creating, ignore_errors=True)
        return
    fs, root = filesystem(path)
    target = f"{root.rstrip('/')}/{STAGING}"
    if fs.exists(target):
        fs.rm(target, recursive=True)


def growth_progress(path: str) -> tuple[int, int] | None:
    """(complete, total) shards of the staging cache of a cache mid-grow; None if it has none."""
    try:
        staged = CacheReader(staging_path(path), require_complete=False)
    except CacheError:
        return None
    return int(staged.complete.sum()), int(len(staged.complete))

