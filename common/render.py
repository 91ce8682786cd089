"""Turn (image, box, flip) into the pixels a model sees: the one renderer.

Stage 1 renders each cached crop at every teacher's input size; stage 2 renders
the same box at the student's size, and an online run at the student's and every
teacher's at once. Keeping the geometry in one place is what makes "the student
sees the teacher's view" true. A renderer is built for a list of :class:`View`
(size + interpolation) and decodes each image once for all of them:
:class:`TorchRenderer` here, or ``common.dali_crops.DaliCropRenderer`` (same
contract: ROI decode, resize, mirror; tested against this one), picked by
:func:`common.loader_kind.build_renderer`. Both check the decoded frame against the manifest's
(:func:`check_frame`), the one "file changed since the manifest" check.

Pixels stay uint8 until they are on the compute device: 4x less host memory and
host-to-device traffic than float32.
"""
from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from common.images import ImageError, open_image

_MODES = {"bilinear": "bilinear", "bicubic": "bicubic", "nearest": "nearest", "linear": "bilinear", "cubic": "bicubic"}


def decode(path) -> torch.Tensor:
    """uint8 [3, H, W], RGB, EXIF orientation applied (the manifest's frame)."""
    # One copy out of PIL; the channel-first result is a view (crops slice it anyway).
    return torch.from_numpy(np.array(open_image(path), dtype=np.uint8)).permute(2, 0, 1)


class View(NamedTuple):
    """One rendering of a crop: square side and resampling (a model's input)."""

    size: int
    interpolation: str = "bilinear"

    @classmethod
    def of(cls, preprocess) -> View:
        """The view a :class:`~common.models.Preprocess` asks for."""
        return cls(preprocess.input_size, preprocess.interpolation)


class Rendered(NamedTuple):
    views: list[torch.Tensor]  # per view uint8 [n*m, 3, S_v, S_v], image-major
    sample_ids: torch.Tensor  # int64 [n*m] (CPU): the ids given, as they came back with the crops


def check_frame(path, decoded: tuple[int, int], recorded: tuple[int, int]) -> None:
    """The decoder's frame (width, height after EXIF orientation) must be the manifest's, or every
    box drawn in the manifest's frame (seeded or cached) lands elsewhere."""
    decoded, recorded = tuple(int(v) for v in decoded), tuple(int(v) for v in recorded)
    if decoded != recorded:
        raise ImageError(
            path, f"decoded as {decoded[0]}x{decoded[1]} (after EXIF orientation) but the manifest says "
            f"{recorded[0]}x{recorded[1]}; the file changed since the manifest was built -- rebuild the manifest "
            "(and the teacher cache)"
        )


def manifest_frames(manifest, image_ids) -> np.ndarray:
    """int64 [n, 2]: the (width, height) the manifest recorded for ``image_ids``, for :func:`check_frame`."""
    ids = np.asarray(image_ids, dtype=np.int64)
    return np.stack([manifest.widths[ids], manifest.heights[ids]], axis=1).astype(np.int64)


def resize_mode(interpolation: str) -> str:
    try:
        return _MODES[interpolation]
    except KeyError:
        raise ValueError(f"unknown interpolation {interpolation!r}; use one of {sorted(_MODES)}") from None


def render_crops(image: torch.Tensor, boxes, flips, size: int, interpolation: str = "bilinear") -> torch.Tensor:
    """Crops of one decoded image: uint8 [n, 3, size, size].

    ``boxes`` is (n, 4) integer x, y, w, h; ``flips`` (n,) 0/1. Antialiased
    resizing, as DALI's resize does, so both paths agree closely. The resize
    runs on uint8 (torch's integer CPU kernels): 2-2.5x faster than converting
    to float32 and back, and within 1 level of it for bilinear (benchmarks in
    docs/performance.md).
    """
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    flips = np.asarray(flips).reshape(-1)
    mode = resize_mode(interpolation)
    kwargs = {"antialias": True, "align_corners": False} if mode != "nearest" else {}
    out = torch.empty((len(boxes), 3, size, size), dtype=torch.uint8)
    for i, (x, y, w, h) in enumerate(boxes):
        crop = image[:, y : y + h, x : x + w].unsqueeze(0)
        resized = F.interpolate(crop, size=(size, size), mode=mode, **kwargs)[0]
        out[i] = resized.flip(-1) if flips[i] else resized
    return out


class TorchRenderer:
    """Decode with PIL, render every view with :func:`render_crops`; images spread over ``workers``
    threads (PIL decoding and torch's resize release the GIL)."""

    kind = "torch"

    def __init__(self, views: Sequence[View], workers: int = 1, pin_memory: bool = False):
        self.views = [View(*v) for v in views]
        self.pin_memory = pin_memory
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="decode") if workers > 1 else None

    def __call__(self, paths, boxes, flips, frames=None) -> list[torch.Tensor]:
        """The views only; see :meth:`render`."""
        return self.render(paths, boxes, flips, frames).views

    def render(self, paths: Sequence[str | os.PathLike], boxes, flips, frames=None, sample_ids=None) -> Rendered:
        """Crops of ``paths``, each decoded once: ``boxes`` one int [n, m, 4] per view (x, y, w, h),
        ``flips`` [n, m]; ``frames`` the manifest's (width, height) per image, checked when given;
        ``sample_ids`` [n, m] come back beside the crops (default 0..n*m-1)."""
        n = len(paths)
        boxes = [np.asarray(b).reshape(n, -1, 4) for b in boxes]
        flips = np.asarray(flips).reshape(n, -1)
        frames = [None] * n if frames is None else frames
        per_image = list((self._pool.map if self._pool is not None else map)(
            lambda i: self._render_image(paths[i], [b[i] for b in boxes], flips[i], frames[i]), range(n)))
        views = [torch.cat(parts) for parts in zip(*per_image)] if per_image else \
            [torch.empty((0, 3, v.size, v.size), dtype=torch.uint8) for v in self.views]
        if self.pin_memory:
            views = [v.pin_memory() for v in views]
        ids = np.arange(n * flips.shape[1]) if sample_ids is None else np.asarray(sample_ids)
        return Rendered(views, torch.as_tensor(ids, dtype=torch.int64).reshape(-1))

    def _render_image(self, path, boxes, flips, frame) -> list[torch.Tensor]:
        image = decode(path)  # once, for every view
        if frame is not None:
            check_frame(path, (image.shape[2], image.shape[1]), frame)
        return [render_crops(image, b, flips, v.size, v.interpolation) for b, v in zip(boxes, self.views)]


def normalize(batch: torch.Tensor, mean, std, device=None, memory_format=torch.contiguous_format) -> torch.Tensor:
    """uint8 [B, 3, S, S] -> float32 normalised on ``device`` (mean/std in 0..1 units)."""
    batch = batch.to(device, non_blocking=True) if device is not None else batch
    m, s = _mean_std(tuple(mean), tuple(std), batch.device)
    return ((batch.float() - m) / s).contiguous(memory_format=memory_format)


@functools.lru_cache(maxsize=32)
def _mean_std(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Built once per (mean, std, device): a fresh torch.tensor(..., device=cuda) each
    batch is a blocking host-to-device copy that stalls the GPU queue."""
    m, s = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1).mul(255.0).to(device) for v in (mean, std))
    return m, s
