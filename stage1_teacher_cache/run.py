"""`pipeline teacher-cache`: run the teacher ensemble once over every cached crop.

The shard (``images_per_shard`` images) is the unit of work, of resume and of
parallelism: a rank computes a whole shard in memory and writes it in one
call, whose completion record is the commit point. Rerunning the command skips
complete shards; a kill loses only the shards in flight. Under torchrun rank r
takes shards s with s % world_size == r, so hosts never share a Zarr chunk.

Everything a shard's numbers depend on (manifest, teachers, crop policy and
seed, temperature, k, shard size) is recorded in the cache's identity
attributes, and a run with different inputs is refused -- that is what makes a
resumed cache equal to one built in a single run.

With ``reuse_crops`` the boxes and flips are read from an existing cache of the
same manifest instead of drawn from the seed (the stored boxes are
authoritative), so a new teacher's cache can later be merged with that one.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import sys
import time
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from common import cache_storage
from common.cache_format import CacheError, CacheReader, CacheWriter
from common.config import Config, ConfigError, CropConfig
from common.crops import Boxes, check_boxes_inside, image_boxes
from common.distributed import fail_together, peer_may_be_gone
from common.locations import absolute
from common.manifest import ConfinedPaths, Manifest, load_manifest
from common.prefetch import prefetch
from common.render import manifest_frames
from common.runtime import Runtime, build_runtime
from stage1_teacher_cache.ensemble import RULE, ensemble_topk, teacher_probs
from stage1_teacher_cache.evaluate import check_teachers, evaluate_teachers
from stage1_teacher_cache.distill_advice import advise, scored_on
from stage1_teacher_cache.label_agreement import format_label_agreement, record_label_agreement
from stage1_teacher_cache.teacher_eval import ensemble_warnings, format_eval_table
from stage1_teacher_cache.grow import CropSource, open_growth
from stage1_teacher_cache.info import bytes_on_disk, human_bytes
from stage1_teacher_cache.teachers import Teacher, load_teachers
from stage1_teacher_cache.views import batches, make_renderer

CROP_ALGORITHM = "torchvision.RandomResizedCrop/counter-hash-v1"

def run(cfg: Config, reuse_crops: str | None = None, more_crops: int = 0) -> dict[str, Any]:
    """Build (or resume) the cache; ``reuse_crops``: take the crops of this cache instead of the seed;
    ``more_crops``: append that many crops to the complete ``crops.num_crops``-crop cache (grow.py).

    Both are arguments, not config keys: they describe one invocation on existing
    artifacts rather than a setting of the pipeline.
    """
    tc = cfg.teacher_cache
    if not cfg.data.manifest:
        raise ConfigError("no training manifest: pass --manifest M (or set data.manifest)")
    if not tc.out:
        raise ConfigError("no cache directory: pass --out CACHE (or set teacher_cache.out)")
    if more_crops and reuse_crops:
        raise ConfigError("--more-crops draws the new crops from the seed; it cannot be combined with --reuse-crops "
                          "(grow the cache whose crops were reused, then build this one on its crops again)")
    runtime = build_runtime(cfg.runtime)
    # Under torchrun every rank reads the inputs; one that cannot stops them all (common/distributed.py).
    with fail_together(runtime):
        manifest = load_manifest(cfg.data.manifest, data_root=cfg.data.data_root or None)
        k = kept_classes(tc.topk, manifest.num_classes)
        teachers = load_teachers(tc, manifest.num_classes, runtime, seed=cfg.runtime.seed)
        crop_attrs, crop_boxes = crop_source(cfg.crops, manifest, reuse_crops)

    # on every rank: each scores a share, all reach the same verdict
    evaluation = check_before_caching(cfg, manifest, teachers, runtime) if tc.evaluate_manifest else None

    attrs = cache_attrs(cfg, manifest, teachers, k, evaluation, runtime, crop_attrs, reuse_crops)
    growth = None
    if more_crops:
        growth = open_growth(tc.out, attrs, more_crops, runtime, lambda first, count: seeded_crops(
            dataclasses.replace(cfg.crops, num_crops=count), manifest, first))
        writer, crop_boxes, write_shard = growth.writer, growth.crop_boxes, growth.write_shard
    else:
        writer = open_cache(tc.out, attrs, runtime)
        write_shard = writer.write_shard
    if evaluation is not None and runtime.is_main:
        writer.group.attrs.update({"teacher_eval": evaluation})  # also when resuming an existing cache
    complete = writer.complete_shards()
    mine = [s for s in range(len(complete)) if s % runtime.world_size == runtime.rank]
    todo = [s for s in mine if not complete[s]]

    C = growth.crops_per_image if growth else crop_attrs["num_crops"]  # crops rendered per image
    group = max(1, tc.batch_size // C)  # images per render call: about one forward batch
    render = make_renderer(tc.loader, runtime, [t.preprocess for t in teachers], C, group)
    path_of = ConfinedPaths(manifest)
    # (boxes, flips) of each shard whose render jobs were handed out, oldest first: drawn (or read) once,
    # here, and taken by the shard loop when it writes the shard (after every job of it was rendered).
    shard_crops: collections.deque[tuple[np.ndarray, np.ndarray]] = collections.deque()

    def render_jobs() -> Iterator[tuple[range, list[np.ndarray], np.ndarray]]:
        for shard in todo:
            start, stop = writer.shard_range(shard)
            xywh, flip = crop_boxes(start, stop)
            shard_crops.append((xywh, flip))
            for lo in range(0, stop - start, group):
                rows = slice(lo, lo + group)
                yield range(start + lo, min(start + lo + group, stop)), [xywh[rows]] * len(teachers), flip[rows]

    def render_group(job: tuple[range, list[np.ndarray], np.ndarray]) -> list[torch.Tensor]:
        # Paths are checked here, in the job, so a bad file surfaces in order: after every shard before it is written.
        ids, boxes, flips = job
        return render([path_of(i) for i in ids], boxes, flips, manifest_frames(manifest, ids))

    # One iterator over every shard of this rank, so rendering runs ahead across shard boundaries.
    views = prefetch(render_group, render_jobs(), runtime.num_workers, depth=2 * runtime.num_workers + 2)
    total_images = sum(_shard_size(writer, s) for s in todo)
    bar = tqdm(total=total_images, desc=f"teacher cache (rank {runtime.rank})" if runtime.distributed
               else "teacher cache", unit="img", disable=not (runtime.progress and todo), smoothing=0.05)
    started = time.perf_counter()
    # (wall, main-thread CPU, process CPU, crops) after each shard's forward passes: the steady-state
    # rate without the first shard's pipeline fill (benchmarks/bench_stage1.py)
    shard_stamps: list[tuple[float, float, float, int]] = []
    with bar:
        for shard in todo:
            start, stop = writer.shard_range(shard)
            shard_views = _progress(itertools.islice(views, -(-(stop - start) // group)), bar, C, started)
            index, prob = shard_targets(shard_views, teachers, runtime, tc.batch_size, tc.temperature, k)
            shard_stamps.append((time.perf_counter(), time.thread_time(), time.process_time(), len(index)))
            xywh, flip = shard_crops.popleft()  # this shard's: its groups were all rendered above
            write_shard(shard, xywh, flip, index, prob)

    summary = summarize(writer, runtime, tc.out, shards_written=len(todo), skipped=len(mine) - len(todo),
                        images=total_images, crops=total_images * C, started=started)
    if growth is not None:
        summary["grown"] = {"from_crops": growth.from_crops, "to_crops": growth.to_crops,
                            "now": growth.finish(runtime)}
    # Every rank's shards are written (summarize waited for them): one pass over the top-1s, on rank 0.
    if runtime.is_main and summary["shards_complete"] == summary["shards_total"]:
        summary["label_agreement"] = record_label_agreement(tc.out, manifest)
    if growth is not None or "label_agreement" in summary:  # the size again: attributes (and arrays) changed
        size = bytes_on_disk(tc.out)  # without the staging cache after a growth
        cached_crops = summary["shards_complete"] and writer.layout.num_images * (growth.to_crops if growth else C)
        summary.update(bytes_on_disk=size, bytes_per_crop=size / cached_crops if cached_crops else None)
    summary.update(teacher_eval=evaluation, shard_stamps=shard_stamps)
    if runtime.is_main:
        print(format_summary(summary))
        if "label_agreement" in summary:
            print("\n".join(format_label_agreement(summary["label_agreement"], list(manifest.class_names))))
    return summary


def shard_targets(views: Iterable[list[torch.Tensor]], teachers: list[Teacher], runtime: Runtime,
                  batch_size: int, temperature: float, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of the ensemble for every crop of a shard, image-major: (index, prob) [n * C, k]."""
    index, prob = zip(*(ensemble_topk(teacher_probs(teachers, batch, runtime, temperature), k)
                        for batch in batches(views, batch_size)))
    return np.concatenate(index), np.concatenate(prob)


def kept_classes(topk: int, num_classes: int) -> int:
    """k is capped at the class count: keeping every class is lossless, more is impossible."""
    if topk > num_classes:
        print(f"note: topk {topk} > {num_classes} classes; keeping all {num_classes}", file=sys.stderr)
    return min(topk, num_classes)


def shard_boxes(crops: CropConfig, manifest: Manifest, start: int, stop: int, first_crop: int = 0) -> Boxes:
    """Crops first_crop..first_crop+num_crops-1 of images start..stop-1: a pure function of the seed,
    so stage 2 can replay them (and a grown cache continues them)."""
    ids = np.arange(start, stop)
    return image_boxes(crops.seed, ids, manifest.widths[ids], manifest.heights[ids], crops.num_crops,
                       scale=crops.scale, ratio=crops.ratio, flip_p=crops.flip_p, first_crop=first_crop)


def seeded_crops(crops: CropConfig, manifest: Manifest, first_crop: int = 0) -> CropSource:
    def seeded(start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        b = shard_boxes(crops, manifest, start, stop, first_crop)
        return b.as_array(), b.flip

    return seeded


def crop_source(crops: CropConfig, manifest: Manifest, reuse: str | None) -> tuple[dict[str, Any], CropSource]:
    """(crops attribute, boxes of a range of images): from the seed, or read from the cache ``reuse``."""
    if reuse is None:
        return {
            "algorithm": CROP_ALGORITHM,
            "num_crops": crops.num_crops,
            "scale": list(crops.scale),
            "ratio": list(crops.ratio),
            "flip_p": crops.flip_p,
            "seed": crops.seed,
        }, seeded_crops(crops, manifest)

    source = CacheReader(reuse, manifest_hash=manifest.content_hash, verify_checksums=True)
    policy = source.attrs["crops"]
    print(f"note: reusing the {policy['num_crops']} crops per image of {reuse} (seed {policy.get('seed')}); "
          "the [crops] settings are ignored", file=sys.stderr)

    def cached(start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        rows = source.images(np.arange(start, stop))
        check_boxes_fit(rows["boxes"], rows["flip"], manifest, start, reuse)
        return rows["boxes"], rows["flip"]

    return policy, cached


def check_boxes_fit(boxes: np.ndarray, flip: np.ndarray, manifest: Manifest, start: int, source: str) -> None:
    """Boxes read from a cache (maybe a stranger's) must lie inside their images."""
    ids = np.arange(start, start + len(boxes))
    check_boxes_inside(boxes, manifest.widths[ids], manifest.heights[ids], flips=flip, error=CacheError,
                       where=lambda i, c: f"{source}: crop {c} of image {start + i}",
                       remedy="that cache's crops cannot be reused")


def check_before_caching(cfg: Config, train: Manifest, teachers: list[Teacher], runtime: Runtime) -> dict:
    """Evaluate the teachers on the validation manifest; warn if a teacher lowers the ensemble;
    stop (every rank) if one is near chance."""
    tc = cfg.teacher_cache
    with fail_together(runtime):
        val = load_manifest(tc.evaluate_manifest, data_root=cfg.data.data_root or None)
        if val.class_names != train.class_names:
            raise ConfigError(
                f"evaluation manifest {val.path} has classes {list(val.class_names)[:5]}... but the training "
                f"manifest has {list(train.class_names)[:5]}...; both must list the same classes in the same order"
            )
        render = make_renderer(tc.loader, runtime, [t.preprocess for t in teachers], 1, tc.batch_size)
    result = evaluate_teachers(teachers, val, runtime, render, tc.batch_size, tc.temperature)
    if runtime.is_main:
        print(format_eval_table(result))
        for warning in ensemble_warnings(result):  # a weak ensemble is worth a warning, not a refusal
            print(f"warning: {warning}", file=sys.stderr)
        # before the cache is paid for: the measured rule needs only the ensemble and a short hard-label run
        advice = advise(result["ensemble"]["top1"], None, cfg.distill.hard_label_top1, cfg.optim.epochs,
                        where=scored_on(result))
        for line in advice.lines:
            print(line, file=sys.stderr)
    check_teachers(result, tc.min_top1_over_chance)  # same numbers on every rank, so every rank stops
    return result


def cache_attrs(cfg: Config, manifest: Manifest, teachers: list[Teacher], k: int, evaluation: dict | None,
                runtime: Runtime, crops: dict[str, Any], crops_from: str | None) -> dict[str, Any]:
    """Group attributes. Only the keys in cache_format.IDENTITY_KEYS must match to resume or append,
    so everything that may legitimately differ between runs (paths, times, eval numbers, the full
    config) lives outside them."""
    return cache_storage.cache_attrs(
        manifest={"hash": manifest.content_hash, "num_images": manifest.num_images},
        num_classes=manifest.num_classes,
        teachers=[t.identity() for t in teachers],
        ensemble={"rule": RULE, "temperature": cfg.teacher_cache.temperature},
        crops=crops,
        k=k,
        images_per_shard=cfg.teacher_cache.images_per_shard,
        # not identity:
        manifest_path=absolute(manifest.path),
        class_names=list(manifest.class_names),
        teacher_files={t.name: t.weights_path for t in teachers if t.weights_path},
        teacher_eval=evaluation,
        crops_from=crops_from,  # the cache whose boxes were reused, if any
        # The creator's; bf16 on a GPU and fp32 on a CPU give slightly different probabilities,
        # so hosts that share a cache should share a precision.
        compute={"device": runtime.device.type, "dtype": str(runtime.dtype).removeprefix("torch."),
                 "world_size": runtime.world_size},
        config=cfg.to_dict(),
    )


def open_cache(path: str, attrs: dict[str, Any], runtime: Runtime) -> CacheWriter:
    """Rank 0 creates (or checks) the cache before any other rank opens it; if rank 0 refuses it
    (other inputs, unreadable), every rank stops with that message."""
    with fail_together(runtime):
        writer = CacheWriter(path, attrs) if runtime.is_main else None
    return writer or CacheWriter(path, attrs)


def _shard_size(writer: CacheWriter, shard: int) -> int:
    start, stop = writer.shard_range(shard)
    return stop - start


def _progress(groups: Iterable[list[torch.Tensor]], bar: tqdm, crops_per_image: int, started: float) -> Iterator:
    for views in groups:
        yield views
        bar.update(len(views[0]) // crops_per_image)
        bar.set_postfix_str(f"{bar.n * crops_per_image / (time.perf_counter() - started):.1f} crops/s", refresh=False)


def summarize(writer: CacheWriter, runtime: Runtime, path: str, *, shards_written: int, skipped: int,
              images: int, crops: int, started: float) -> dict[str, Any]:
    counts = torch.tensor([shards_written, skipped, images, crops], dtype=torch.int64, device=runtime.device)
    if runtime.distributed and torch.distributed.is_initialized():
        # Totals over ranks; also waits for every rank's last shard. A rank that failed on a shard has
        # exited at once with its message (torchrun then stops the others); one already waiting here says so.
        with peer_may_be_gone("every rank's last shard"):
            torch.distributed.all_reduce(counts)
    shards_written, skipped, images, crops = counts.tolist()
    seconds = time.perf_counter() - started  # after the reduce: the wall time of the slowest rank
    complete = writer.complete_shards()
    cached_crops = sum(_shard_size(writer, s) for s in np.flatnonzero(complete)) * writer.layout.num_crops
    size = bytes_on_disk(path)
    return {
        "cache": path,
        "shards_written": shards_written,
        "shards_skipped": skipped,
        "shards_complete": int(complete.sum()),
        "shards_total": int(len(complete)),
        "images": images,
        "crops": crops,
        "seconds": seconds,
        "crops_per_s": crops / seconds if seconds > 0 else 0.0,
        "bytes_on_disk": size,
        "bytes_per_crop": float(size / cached_crops) if cached_crops else None,
    }


def format_summary(s: dict[str, Any]) -> str:
    per_crop = f"{s['bytes_per_crop']:.1f} B/crop" if s["bytes_per_crop"] is not None else "n/a B/crop"
    return (
        f"teacher cache {s['cache']}: wrote {s['shards_written']} shard(s) ({s['shards_skipped']} already complete), "
        f"{s['images']:,} images, {s['crops']:,} crops in {s['seconds']:.1f} s ({s['crops_per_s']:,.1f} crops/s)\n"
        f"{s['shards_complete']}/{s['shards_total']} shards complete; "
        f"{human_bytes(s['bytes_on_disk'])} on disk, {per_crop}"
    ) + (f"\ngrown from {g['from_crops']} to {g['to_crops']} crops per image" if (g := s.get("grown")) and g["now"]
         else f"\nthe cache has {g['to_crops']} crops per image" if g else "")
