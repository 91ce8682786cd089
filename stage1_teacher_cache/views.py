"""From image files to batches of teacher views.

A "view" is a crop rendered at one teacher's size and interpolation. Work is
handed out in small groups of images; a renderer turns a group into one uint8
tensor per teacher ([images x crops, 3, S_t, S_t], image-major). Groups are
rendered on a thread pool ahead of the forward passes (Pillow, torch's resize
and DALI release the GIL), in order, with a bounded look-ahead so memory stays
flat.

Two renderers share that contract: the pure-PyTorch one decodes each image once
and renders every teacher's crops from it; the DALI one (common/dali_crops.py)
runs one pipeline per teacher (so an image is decoded once per teacher, which
nvJPEG on the GPU makes cheap next to the teachers' forward passes).
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np
import torch

from common.config import ConfigError
from common.images import ImageError
from common.models import Preprocess
from common.render import decode, render_crops
from common.runtime import Runtime

T = TypeVar("T")
R = TypeVar("R")

# (paths [n], per-teacher boxes [n, m, 4], flips [n, m]) -> per-teacher uint8 [n*m, 3, S_t, S_t]
Renderer = Callable[[Sequence[str], Sequence[np.ndarray], np.ndarray], list[torch.Tensor]]


def torch_renderer(preprocesses: Sequence[Preprocess]) -> Renderer:
    def render(paths, boxes, flips):
        per_image = []
        for i, path in enumerate(paths):
            image = decode(path)  # once, for every teacher
            check_boxes_inside(path, image, [b[i] for b in boxes])
            per_image.append([render_crops(image, b[i], flips[i], p.input_size, p.interpolation)
                              for b, p in zip(boxes, preprocesses)])
        return [torch.cat(parts) for parts in zip(*per_image)]

    return render


def check_boxes_inside(path, image: torch.Tensor, boxes: Sequence[np.ndarray]) -> None:
    """A box past the decoded image would render a sliver (or nothing) silently: the file no longer
    has the size the manifest recorded, i.e. it changed after the manifest was built."""
    xywh = np.concatenate([np.asarray(b, dtype=np.int64).reshape(-1, 4) for b in boxes])
    need_w, need_h = int((xywh[:, 0] + xywh[:, 2]).max()), int((xywh[:, 1] + xywh[:, 3]).max())
    height, width = image.shape[1:]
    if need_w > width or need_h > height:
        raise ImageError(path, f"decodes to {width}x{height} but its crops need at least {need_w}x{need_h}: "
                               "the file changed after the manifest was built; rebuild the manifest")


def dali_renderer(preprocesses: Sequence[Preprocess], runtime: Runtime, crops_per_image: int,
                  images_per_call: int) -> Renderer:
    from common.dali_crops import DaliCropRenderer

    device_id = None  # DALI's CPU backend
    if runtime.is_cuda:  # "cuda" without an index means the current device, which the runtime has set
        device_id = runtime.device.index if runtime.device.index is not None else torch.cuda.current_device()
    renderers = [DaliCropRenderer(p.input_size, p.interpolation, batch_size=images_per_call,
                                  num_threads=max(1, runtime.num_workers), device_id=device_id,
                                  crops_per_image=crops_per_image) for p in preprocesses]

    def render(paths, boxes, flips):
        return [r.render(list(paths), b, flips) for r, b in zip(renderers, boxes)]

    return render


def dali_available() -> bool:
    try:
        import common.dali_crops  # noqa: F401  (imports nvidia.dali)
    except ImportError:
        return False
    return True


def make_renderer(loader: str, runtime: Runtime, preprocesses: Sequence[Preprocess], crops_per_image: int,
                  images_per_call: int) -> Renderer:
    """``torch`` always; ``dali`` when installed; ``auto`` = DALI on CUDA only (on CPU torch is as fast)."""
    if loader == "torch" or (loader == "auto" and not (runtime.is_cuda and dali_available())):
        return torch_renderer(preprocesses)
    if not dali_available():
        raise ConfigError("teacher_cache.loader = \"dali\" but NVIDIA DALI is not installed here; "
                         "install nvidia-dali or use --loader torch")
    return dali_renderer(preprocesses, runtime, crops_per_image, images_per_call)


def prefetch(fn: Callable[[T], R], items: Iterable[T], workers: int, depth: int) -> Iterator[R]:
    """``map(fn, items)`` in order, computed up to ``depth`` items ahead on ``workers`` threads."""
    if workers <= 0:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="render") as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


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
