"""Turn (image, box, flip) into the pixels a model sees -- the pure-PyTorch path.

Stage 1 renders each cached crop at every teacher's input size; stage 2 renders
the same box at the student's size. Keeping the geometry in one place is what
makes "the student sees the teacher's view" true. The DALI loaders implement the
same contract (ROI decode, resize, mirror) and are tested against this one.

Pixels stay uint8 until they are on the compute device: 4x less host memory and
host-to-device traffic than float32.
"""
from __future__ import annotations

import functools
import numpy as np
import torch
import torch.nn.functional as F

from common.images import open_image

_MODES = {"bilinear": "bilinear", "bicubic": "bicubic", "nearest": "nearest", "linear": "bilinear", "cubic": "bicubic"}


def decode(path) -> torch.Tensor:
    """uint8 [3, H, W], RGB, EXIF orientation applied (the manifest's frame)."""
    # One copy out of PIL; the channel-first result is a view (crops slice it anyway).
    return torch.from_numpy(np.array(open_image(path), dtype=np.uint8)).permute(2, 0, 1)


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


def normalize(batch: torch.Tensor, mean, std, device=None, memory_format=torch.contiguous_format) -> torch.Tensor:
    """uint8 [B, 3, S, S] -> float32 normalised on ``device`` (mean/std in 0..1 units)."""
    batch = batch.to(device, non_blocking=True) if device is not None else batch
    m, s = _mean_std(tuple(mean), tuple(std), batch.device)
    return ((batch.float() - m) / s).contiguous(memory_format=memory_format)


@functools.lru_cache(maxsize=32)
def _mean_std(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Built once per (mean, std, device): a fresh torch.tensor(..., device=cuda) each
    batch is a blocking host-to-device copy that stalls the GPU queue."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1).mul(255.0).to(device)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1).mul(255.0).to(device)
    return m, s
