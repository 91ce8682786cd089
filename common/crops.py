"""Seeded, counter-based RandomResizedCrop boxes: a pure function of its inputs.

Stage 1 draws the crops the teachers see; stage 2 replays them. Both must get
the same box for (seed, image_id, crop_index) on any machine, in any process,
whatever else is in the batch -- so no global RNG and no sequential state: every
random number is a hash of (seed, image_id, crop_index, draw number).

The algorithm is torchvision's ``RandomResizedCrop.get_params`` (10 tries of
area scale x log-uniform aspect ratio, then a centre crop clamped to the ratio
range), evaluated for all tries at once so that whole arrays of images are
handled without a Python loop.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import numpy as np

TRIES = 10
# Draw numbers: each random quantity gets its own stream so that changing one
# (e.g. flip_p) never shifts another.
_AREA, _RATIO, _TOP, _LEFT, _FLIP = 0, TRIES, 2 * TRIES, 3 * TRIES, 4 * TRIES

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


class Boxes(NamedTuple):
    """Integer crop boxes in the (EXIF-oriented) image frame, plus the mirror flag."""

    x: np.ndarray  # int32, left
    y: np.ndarray  # int32, top
    w: np.ndarray  # int32
    h: np.ndarray  # int32
    flip: np.ndarray  # uint8, 1 = mirror horizontally

    def as_array(self) -> np.ndarray:
        """(..., 4) int32 array of x, y, w, h: the layout stored in the cache."""
        return np.stack([self.x, self.y, self.w, self.h], axis=-1).astype(np.int32)


def _splitmix64(z: np.ndarray) -> np.ndarray:
    z = (z + np.uint64(0x9E3779B97F4A7C15)) & _M64
    z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _M64
    z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _M64
    return z ^ (z >> np.uint64(31))


def _uniform(seed: int, image_id: np.ndarray, crop_index: np.ndarray, draw: int) -> np.ndarray:
    """U[0, 1) doubles from a hash chain over the counters (53 random bits)."""
    with np.errstate(over="ignore"):
        h = _splitmix64(np.full(image_id.shape, seed, dtype=np.uint64))
        h = _splitmix64(h ^ image_id.astype(np.uint64))
        h = _splitmix64(h ^ crop_index.astype(np.uint64))
        h = _splitmix64(h ^ np.uint64(draw))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def boxes(
    seed: int,
    image_id,
    crop_index,
    width,
    height,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    flip_p: float = 0.5,
) -> Boxes:
    """RandomResizedCrop boxes for broadcastable arrays of images and crop indices.

    ``image_id``, ``crop_index``, ``width`` and ``height`` are integers or arrays
    that broadcast together; the result has their broadcast shape.
    """
    image_id, crop_index, width, height = np.broadcast_arrays(
        *(np.asarray(a, dtype=np.int64) for a in (image_id, crop_index, width, height))
    )
    if np.any(image_id < 0) or np.any(crop_index < 0):
        raise ValueError("image_id and crop_index must be >= 0")
    if np.any(width < 1) or np.any(height < 1):
        raise ValueError("width and height must be >= 1")
    shape = image_id.shape
    u = lambda draw: _uniform(seed, image_id, crop_index, draw)  # noqa: E731

    area = (width * height).astype(np.float64)
    log_r0, log_r1 = math.log(ratio[0]), math.log(ratio[1])

    # Evaluate all tries; keep the first that fits (torchvision returns on the first).
    chosen = np.zeros(shape, dtype=bool)
    x, y, w, h = (np.zeros(shape, dtype=np.int64) for _ in range(4))
    for t in range(TRIES):
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u(_AREA + t))
        aspect = np.exp(log_r0 + (log_r1 - log_r0) * u(_RATIO + t))
        tw = np.round(np.sqrt(target_area * aspect)).astype(np.int64)
        th = np.round(np.sqrt(target_area / aspect)).astype(np.int64)
        ok = ~chosen & (tw > 0) & (tw <= width) & (th > 0) & (th <= height)
        # randint(0, n) as floor(u * n): uniform over 0..n-1
        ty = np.floor(u(_TOP + t) * (height - th + 1)).astype(np.int64)
        tx = np.floor(u(_LEFT + t) * (width - tw + 1)).astype(np.int64)
        x, y, w, h = (np.where(ok, new, old) for new, old in ((tx, x), (ty, y), (tw, w), (th, h)))
        chosen |= ok

    # Fallback: centre crop, clamped to the ratio range (torchvision's rule).
    in_ratio = width / height
    fw = np.where(in_ratio < ratio[0], width, np.where(in_ratio > ratio[1], np.round(height * ratio[1]), width))
    fh = np.where(in_ratio < ratio[0], np.round(width / ratio[0]), height)
    fw = np.clip(fw.astype(np.int64), 1, width)
    fh = np.clip(fh.astype(np.int64), 1, height)
    fx, fy = (width - fw) // 2, (height - fh) // 2
    x, y, w, h = (np.where(chosen, a, b) for a, b in ((x, fx), (y, fy), (w, fw), (h, fh)))

    flip = (u(_FLIP) < flip_p).astype(np.uint8)
    return Boxes(x.astype(np.int32), y.astype(np.int32), w.astype(np.int32), h.astype(np.int32), flip)


def image_boxes(seed: int, image_ids, widths, heights, num_crops: int, first_crop: int = 0, **policy) -> Boxes:
    """Boxes first_crop..first_crop+num_crops-1 of each image: arrays of shape (len(image_ids), num_crops)."""
    image_ids = np.asarray(image_ids, dtype=np.int64)[:, None]
    crop_index = np.arange(first_crop, first_crop + num_crops, dtype=np.int64)[None, :]
    return boxes(
        seed, image_ids, crop_index, np.asarray(widths)[:, None], np.asarray(heights)[:, None], **policy
    )


def centre_box(width: int, height: int, crop_pct: float = 0.875) -> tuple[int, int, int, int]:
    """The square centre crop used for evaluation: side = crop_pct * shorter side."""
    side = max(1, int(round(min(width, height) * crop_pct)))
    return (width - side) // 2, (height - side) // 2, side, side


def check_boxes_inside(boxes, widths, heights, *, where: Callable[[int, int], str], remedy: str,
                       flips=None, error: Callable[[str], Exception] = ValueError) -> None:
    """Raise ``error(message)`` naming the first box that does not lie inside its image.

    ``boxes``: int [n, m, 4] x, y, w, h (m crops of each of n images); ``widths`` /
    ``heights``: [n], the frame the boxes must fit. ``flips`` [n, m], when given,
    must be 0 or 1. ``where(i, j)`` names crop j of image i in the message, which
    ends with ``remedy``. The one check for every place boxes come from outside
    :func:`boxes` (which stays inside by construction): a cache's stored boxes,
    or a frame that may have changed since the boxes were drawn.
    """
    boxes = np.asarray(boxes).astype(np.int64, copy=False)
    if boxes.size == 0:  # e.g. a rank with no images this epoch
        return
    boxes = boxes.reshape(len(boxes), -1, 4)
    w = np.asarray(widths, dtype=np.int64).reshape(-1, 1)
    h = np.asarray(heights, dtype=np.int64).reshape(-1, 1)
    x, y, bw, bh = (boxes[..., k] for k in range(4))
    bad = (x < 0) | (y < 0) | (bw < 1) | (bh < 1) | (x + bw > w) | (y + bh > h)
    if flips is not None:
        flips = np.asarray(flips).reshape(bad.shape)
        bad |= (flips != 0) & (flips != 1)
    if bad.any():
        i, j = (int(v) for v in np.argwhere(bad)[0])
        flip = f" flip {int(flips[i, j])}" if flips is not None else ""
        raise error(f"{where(i, j)}: box {boxes[i, j].tolist()}{flip} is not inside the "
                    f"{int(w[i, 0])}x{int(h[i, 0])} image; {remedy}")
