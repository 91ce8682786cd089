"""Stage 2 data loading: planned samples -> rendered, normalised, checked batches.

One :class:`Loader` serves three modes:

* ``distill``: the crops of the teacher cache. Which cached crop each image
  uses per epoch comes from :mod:`stage2_student_distill.plan`; the box, flip
  and soft targets come from the cache, which is authoritative (the student is
  shown exactly the view the teachers scored).
* ``train``: hard-label training; fresh seeded RandomResizedCrop boxes from
  ``common.crops`` with crop index ``epoch * m + j``.
* ``eval``: the centre crop of every image exactly once, in id order.

Rendering is ``common.render``'s renderer (PyTorch or DALI); the boxes are
planned here, not by the renderer, so both render the same crops. A background
thread (``common.prefetch``) keeps a few rendered batches ahead of the training
loop, and another plans the next epoch while the current one trains. Each
rendered batch carries the sample ids it was made from, and they are compared
with the plan: a mismatch raises instead of training on misaligned targets.

For online MEAL V2 (``views=``, targets.py) the same renderer call also renders
every crop at each teacher's size and interpolation, from the same decode; the
views travel with the batch.
"""
from __future__ import annotations

import contextlib
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
import torch

from common.cache_format import CacheError
from common.cache_storage import restore_targets
from common.config import ConfigError
from common.crops import centre_box, check_boxes_inside, image_boxes
from common.loader_kind import build_renderer, choose_loader, dali_available  # noqa: F401 (dali_available: for callers)
from common.manifest import ConfinedPaths
from common.prefetch import in_background, prefetch
from common.render import View, manifest_frames, normalize
from common.runtime import to_device
from stage2_student_distill.plan import EpochPlan, epoch_crops, plan_epoch

if TYPE_CHECKING:
    from common.cache_format import CacheReader
    from common.config import CropConfig
    from common.manifest import Manifest
    from common.models import Preprocess
    from common.runtime import Runtime

MODES = ("distill", "train", "eval")
PREFETCH_BATCHES = 3  # batches rendered (or being rendered) ahead of the one the training step uses


@dataclass
class Batch:
    images: torch.Tensor  # float32 normalised [B, 3, S, S] on runtime.device, runtime.memory_format()
    image_ids: torch.Tensor  # int64 [B] (CPU)
    crop_ids: torch.Tensor  # int64 [B] (CPU); -1 for eval centre crops
    sample_ids: torch.Tensor  # int64 [B] (CPU): distill image_id * C + crop_id; train image_id * m + j; eval image_id
    labels: torch.Tensor  # int64 [B] on device (-1 = unlabeled)
    targets: torch.Tensor | None  # float32 [B, K] dense soft targets on device (mode "distill"), else None
    boxes: np.ndarray | None = None  # int32 [B, 4] x, y, w, h of each crop in its image
    flips: np.ndarray | None = None  # uint8 [B]
    views: list[torch.Tensor] | None = None  # online MEAL V2: uint8 [B, 3, S_t, S_t] per teacher (CPU; DALI: device)


@dataclass
class _EpochSamples:
    """One rank's planned samples for one epoch; per-image rows aligned with ``plan.image_ids``."""

    plan: EpochPlan
    crop_ids: np.ndarray  # int64 [n, m]
    sample_ids: np.ndarray  # int64 [n, m]
    boxes: np.ndarray  # int32 [n, m, 4] x, y, w, h
    flips: np.ndarray  # uint8 [n, m]
    topk_index: np.ndarray | None = None  # [n, m, k] (distill)
    topk_prob: np.ndarray | None = None  # [n, m, k] (distill)


class Loader:
    """Batches for one rank; ``epoch(e)`` is deterministic given (seed, e, rank, world_size)."""

    def __init__(
        self,
        backend_kind: str,
        *,
        manifest: Manifest,
        mode: str,
        preprocess: Preprocess,
        batch_size: int,
        runtime: Runtime,
        seed: int = 0,
        cache: CacheReader | None = None,
        crops: CropConfig | None = None,
        crops_per_image: int = 1,
        max_images: int | None = None,
        views: Sequence[Preprocess] | None = None,
    ):
        _validate(manifest, mode, batch_size, cache, crops, crops_per_image)
        self.manifest = manifest
        self.mode = mode
        self.preprocess = preprocess
        self.batch_size = batch_size
        self.runtime = runtime
        self.seed = seed
        self.cache = cache
        self.crops = crops
        self.crops_per_image = crops_per_image
        self.images_per_batch = batch_size // crops_per_image
        self.num_images = manifest.num_images if max_images is None else min(manifest.num_images, max_images)
        self.views = views
        self._path_of = ConfinedPaths(manifest)

        rendered_views = [View.of(p) for p in [preprocess, *(views or [])]]  # the student's first
        self._renderer = build_renderer(backend_kind, rendered_views, runtime, crops_per_image, self.images_per_batch,
                                        workers=max(1, runtime.num_workers), pin_memory=runtime.is_cuda)
        self.kind = self._renderer.kind
        self._current: tuple[int, _EpochSamples] | None = None  # the plan being replayed
        self._next: tuple[int, Future] | None = None  # the next epoch's plan, being built

        rank, world = runtime.rank, runtime.world_size
        if mode == "eval":
            rank_images = len(range(rank, self.num_images, world))
            self._num_batches = -(-rank_images // self.images_per_batch)
            self.num_samples_per_epoch = rank_images
        else:
            self._num_batches = (self.num_images // world) // self.images_per_batch
            self.num_samples_per_epoch = self._num_batches * batch_size
            if self._num_batches == 0:
                raise ConfigError(
                    f"{self.num_images} images over {world} rank(s) do not fill one batch of "
                    f"{self.images_per_batch} images; an epoch would train on nothing -- lower optim.batch_size"
                )

    def __len__(self) -> int:
        return self._num_batches

    def epoch(self, epoch: int) -> Iterator[Batch]:
        samples = self._planned(epoch)
        plan = samples.plan
        assert plan.num_batches == self._num_batches, "plan and __len__ disagree"

        def produce(index: int):
            rows = plan.batch_slice(index)
            ids = plan.image_ids[rows]
            out = self._renderer.render([self._path_of(int(i)) for i in ids],
                                        [samples.boxes[rows]] * len(self._renderer.views), samples.flips[rows],
                                        manifest_frames(self.manifest, ids), samples.sample_ids[rows])
            return out.views[0], out.sample_ids, out.views[1:] if self.views is not None else None

        # One producer thread (the renderer parallelises within a batch; DALI runs one batch at a time).
        # closing(): a training loop that stops early also stops the producer.
        rendered = prefetch(produce, range(plan.num_batches), workers=1, depth=PREFETCH_BATCHES + 1,
                            name="loader-prefetch")
        with contextlib.closing(rendered):
            for index, (pixels, rendered_ids, views) in enumerate(rendered):
                yield self._batch(samples, index, pixels, rendered_ids, views)

    def _planned(self, epoch: int) -> _EpochSamples:
        """The plan of ``epoch`` (built ahead if it was the one expected), and start on the next.

        Training plans change every epoch and read the cache; planning epoch e + 1
        while e trains hides that read. The plan is a pure function of the epoch,
        so building it early changes nothing but the timing. Asking again for the
        epoch being replayed returns the same plan.
        """
        if self._current is not None and self._current[0] == epoch:
            return self._current[1]
        pending, self._next = self._next, None
        samples = pending[1].result() if pending is not None and pending[0] == epoch else self._plan(epoch)
        if self.mode != "eval":
            # On a daemon thread: the plan after the last epoch is never collected and must not delay exit.
            self._next = (epoch + 1, in_background(lambda: self._plan(epoch + 1), name="loader-plan"))
        self._current = (epoch, samples)
        return samples

    def _plan(self, epoch: int) -> _EpochSamples:
        """The epoch's samples for this rank: ids, boxes, flips and (distill) top-k rows."""
        plan = plan_epoch(
            self.num_images,
            seed=self.seed,
            epoch=epoch,
            rank=self.runtime.rank,
            world_size=self.runtime.world_size,
            images_per_batch=self.images_per_batch,
            shuffle=self.mode != "eval",
            # Ranks that read the cache take shard-local shares, so R ranks on a host
            # decompress the cache once per epoch between them rather than R times.
            shard_block=self.cache.layout.images_per_shard if self.mode == "distill" else None,
        )
        ids, m = plan.image_ids, self.crops_per_image
        column = np.arange(m, dtype=np.int64)[None, :]
        if self.mode == "distill":
            C = self.cache.num_crops
            crop_ids = epoch_crops(self.seed, ids, epoch, C, m)
            # One gather for the whole epoch reads each cache shard once; per-batch
            # gathers of shuffled images would re-read a shard for almost every image.
            rows = self.cache.gather(np.repeat(ids, m), crop_ids.reshape(-1))
            samples = _EpochSamples(
                plan,
                crop_ids,
                ids[:, None] * C + crop_ids,
                rows["boxes"].reshape(len(ids), m, 4),
                rows["flip"].reshape(len(ids), m),
                rows["topk_index"].reshape(len(ids), m, -1),
                rows["topk_prob"].reshape(len(ids), m, -1),
            )
            # Cached boxes must lie inside their images: a cache built from other files/orientation fails here.
            # (Train and eval boxes are drawn from the manifest's sizes, inside by construction.)
            check_boxes_inside(
                samples.boxes, self.manifest.widths[ids], self.manifest.heights[ids], flips=samples.flips,
                error=CacheError, where=lambda i, j: f"image {int(ids[i])} ({self.manifest.paths[int(ids[i])]})",
                remedy="the teacher cache was built from different image files -- rebuild it for this manifest",
            )
        elif self.mode == "train":
            crop_ids = np.repeat(epoch * m + column, len(ids), axis=0)
            c = self.crops
            b = image_boxes(c.seed, ids, self.manifest.widths[ids], self.manifest.heights[ids], m, first_crop=epoch * m,
                            scale=c.scale, ratio=c.ratio, flip_p=c.flip_p)
            samples = _EpochSamples(plan, crop_ids, ids[:, None] * m + column, b.as_array(), b.flip)
        else:  # evaluation plans once per loader (``_planned`` keeps the plan of the epoch asked again)
            widths, heights = self.manifest.widths[ids], self.manifest.heights[ids]
            samples = _EpochSamples(
                plan,
                np.full((len(ids), 1), -1, dtype=np.int64),
                ids[:, None].copy(),
                np.array([centre_box(int(w), int(h), self.preprocess.crop_pct) for w, h in zip(widths, heights)],
                         dtype=np.int32).reshape(-1, 1, 4),
                np.zeros((len(ids), 1), dtype=np.uint8),
            )
        return samples

    def _batch(self, samples: _EpochSamples, index: int, pixels: torch.Tensor, rendered_ids: torch.Tensor,
               views: list[torch.Tensor] | None = None) -> Batch:
        rows = samples.plan.batch_slice(index)
        planned_ids = torch.from_numpy(np.ascontiguousarray(samples.sample_ids[rows]).reshape(-1))
        if not torch.equal(rendered_ids.cpu(), planned_ids):
            raise RuntimeError(
                f"{self.kind} loader: batch {index} came back with sample ids {rendered_ids[:8].tolist()}... "
                f"but the plan says {planned_ids[:8].tolist()}...; refusing to pair pixels with the wrong targets"
            )
        m = samples.crop_ids.shape[1]
        image_ids = np.repeat(samples.plan.image_ids[rows], m)
        device = self.runtime.device
        targets = None
        if self.mode == "distill":
            k = samples.topk_index.shape[-1]
            targets = restore_targets(
                samples.topk_index[rows].reshape(-1, k), samples.topk_prob[rows].reshape(-1, k),
                self.cache.num_classes, device,
            )  # fmt: skip
        pp = self.preprocess
        return Batch(
            images=normalize(pixels, pp.mean, pp.std, device, self.runtime.memory_format()),
            image_ids=torch.from_numpy(image_ids),
            crop_ids=torch.from_numpy(np.ascontiguousarray(samples.crop_ids[rows]).reshape(-1)),
            sample_ids=planned_ids,
            labels=to_device(torch.from_numpy(self.manifest.labels[image_ids].astype(np.int64)), device),
            targets=targets,
            boxes=samples.boxes[rows].reshape(-1, 4),
            flips=samples.flips[rows].reshape(-1),
            views=views,
        )


def _validate(manifest, mode, batch_size, cache, crops, crops_per_image) -> None:
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: use one of {', '.join(MODES)}")
    if crops_per_image < 1 or batch_size < 1:
        raise ValueError("batch_size and crops_per_image must be >= 1")
    if batch_size % crops_per_image:
        raise ConfigError(
            f"optim.batch_size {batch_size} must be a multiple of distill.crops_per_image {crops_per_image}: "
            "the crops of one decoded image travel in the same batch"
        )
    if mode == "eval" and crops_per_image != 1:
        raise ValueError("eval uses one centre crop per image; crops_per_image must be 1")
    if mode == "train" and crops is None:
        raise ValueError("mode 'train' needs the crop policy (crops=CropConfig)")
    if mode == "distill":
        if cache is None:
            raise ValueError("mode 'distill' needs the teacher cache (cache=CacheReader)")
        cached = cache.attrs["manifest"]
        if cached["hash"] != manifest.content_hash or int(cached["num_images"]) != manifest.num_images:
            raise CacheError(
                f"the teacher cache was built for manifest {cached['hash'][:16]}... ({cached['num_images']} images) "
                f"but the loader got {manifest.content_hash[:16]}... ({manifest.num_images} images); "
                "pass the manifest the cache was built from"
            )
        if crops_per_image > cache.num_crops:
            raise ConfigError(
                f"distill.crops_per_image {crops_per_image} > the cache's {cache.num_crops} crops per image; "
                "an epoch's crops of one image must be distinct"
            )


def build_loader(kind: str, **options: Any) -> Loader:
    """A :class:`Loader` (``options``: its keyword arguments); ``kind`` is ``optim.loader``: auto | dali | torch
    (the rule: ``common.loader_kind``)."""
    return Loader(choose_loader(kind, options["runtime"], "optim.loader"), **options)
