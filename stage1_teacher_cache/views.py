"""From image files to batches of teacher views.

A "view" is a crop rendered at one teacher's size and interpolation. Work is
handed out in small groups of images; a renderer turns a group into one uint8
tensor per teacher ([images x crops, 3, S_t, S_t], image-major). Groups are
rendered on a thread pool ahead of the forward passes (``common.prefetch``;
Pillow, torch's resize and DALI release the GIL), in order, with a bounded
look-ahead so memory stays flat.

Two renderers share that contract: the pure-PyTorch one decodes each image once
and renders every teacher's crops from it; the DALI one (common/dali_crops.py)
runs one pipeline per teacher (so an image is decoded once per teacher, which
nvJPEG on the GPU makes cheap next to the teachers' forward passes).
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from common.crops import check_boxes_inside
from common.images import ImageError
from common.loader_kind import choose_loader, dali_available  # noqa: F401  (dali_available: for callers)
from common.models import Preprocess
from common.render import decode, render_crops
from common.runtime import Runtime

_FILE_CHANGED = ("the file decodes to another size than the manifest recorded, so it changed after the "
                     "manifest was built; rebuild the manifest")

# (paths [n], per-teacher boxes [n, m, 4], flips [n, m]) -> per-teacher uint8 [n*m, 3, S_t, S_t]
Renderer = Callable[[Sequence[str], Sequence[np.ndarray], np.ndarray], list[torch.Tensor]]


def torch_renderer(preprocesses: Sequence[Preprocess]) -> Renderer:
    def render(paths, boxes, flips):
        per_image = []
        for i, path in enumerate(paths):
            image = decode(path)  # once, for every teacher
            for b in boxes:
                # A box past the decoded image would render a sliver (or nothing) silently.
                check_boxes_inside(b[i][None], [image.shape[2]], [image.shape[1]], where=lambda _, j: f"crop {j}",
                                   error=lambda msg, path=path: ImageError(path, msg), remedy=_FILE_CHANGED)
            per_image.append([render_crops(image, b[i], flips[i], p.input_size, p.interpolation)
                              for b, p in zip(boxes, preprocesses)])
        return [torch.cat(parts) for parts in zip(*per_image)]

    return render


def dali_renderer(preprocesses: Sequence[Preprocess], runtime: Runtime, crops_per_image: int,
                  images_per_call: int) -> Renderer:
    from common.dali_crops import DaliCropRenderer, device_id_for

    device_id = device_id_for(runtime)
    renderers = [DaliCropRenderer(p.input_size, p.interpolation, batch_size=images_per_call,
                                  num_threads=max(1, runtime.num_workers), device_id=device_id,
                                  crops_per_image=crops_per_image) for p in preprocesses]

    def render(paths, boxes, flips):
        return [r.render(list(paths), b, flips) for r, b in zip(renderers, boxes)]

    return render


def renderer_kind(loader: str, runtime: Runtime) -> str:
    """``torch`` or ``dali`` for ``teacher_cache.loader`` (auto | dali | torch; the rule is ``common.loader_kind``'s)."""
    return choose_loader(loader, runtime, "teacher_cache.loader")


def make_renderer(loader: str, runtime: Runtime, preprocesses: Sequence[Preprocess], crops_per_image: int,
                  images_per_call: int) -> Renderer:
    """The renderer ``renderer_kind(loader, runtime)`` names."""
    if renderer_kind(loader, runtime) == "torch":
        return torch_renderer(preprocesses)
    return dali_renderer(preprocesses, runtime, crops_per_image, images_per_call)


def batches(views: Iterable[list[torch.Tensor]], batch_size: int) -> Iterator[list[torch.Tensor]]:
    """Regroup per-teacher views into batches of exactly ``batch_size`` crops (the last may be short)."""
    pending: list[list[torch.Tensor]] = []
    count = 0
    for group in views:
        pending.append(group)
        count += len(group[0])
        while count >= batch_size:
            joined = [torch.cat(parts) for parts in zip(*pending)]
            yield [v[:batch_size] for v in joined]
            rest = [v[batch_size:] for v in joined]
            count -= batch_size
            pending = [rest] if count else []
    if count:
        yield [torch.cat(parts) for parts in zip(*pending)]
