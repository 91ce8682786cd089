"""From image files to batches of teacher views.

A "view" is a crop rendered at one teacher's size and interpolation. Work is
handed out in small groups of images; a renderer turns a group into one uint8
tensor per teacher ([images x crops, 3, S_t, S_t], image-major). Groups are
rendered on a thread pool ahead of the forward passes (``common.prefetch``;
Pillow, torch's resize and DALI release the GIL), in order, with a bounded
look-ahead so memory stays flat.

The renderer is ``common.render``'s (:func:`~common.loader_kind.build_renderer`):
torch or DALI, each decoding an image once for every teacher's view and
checking its frame against the manifest's.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from common.loader_kind import build_renderer, choose_loader, dali_available  # noqa: F401  (dali_available: for callers)
from common.models import Preprocess
from common.render import View
from common.runtime import Runtime

# (paths [n], per-teacher boxes [n, m, 4], flips [n, m], manifest (width, height) [n] or None)
#   -> per-teacher uint8 [n*m, 3, S_t, S_t]
Renderer = Callable[[Sequence[str], Sequence[np.ndarray], np.ndarray, Sequence[tuple[int, int]] | None],
                    list[torch.Tensor]]


def make_renderer(loader: str, runtime: Runtime, preprocesses: Sequence[Preprocess], crops_per_image: int,
                  images_per_call: int) -> Renderer:
    """The renderer ``teacher_cache.loader`` names (auto | dali | torch; the rule is ``common.loader_kind``'s),
    for every teacher's view. One thread per call: stage 1 renders several calls at once (``common.prefetch``)."""
    kind = choose_loader(loader, runtime, "teacher_cache.loader")
    return build_renderer(kind, [View.of(p) for p in preprocesses], runtime, crops_per_image, images_per_call)


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
