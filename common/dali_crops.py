"""Crop rendering with NVIDIA DALI: encoded image + boxes + flips -> uint8 crops.

The DALI twin of ``common.render.TorchRenderer``: same contract, same frame,
close pixels. For each image it decodes once (EXIF orientation applied, as PIL's
``exif_transpose`` does, so boxes drawn in the manifest's frame land on the same
pixels), cuts ``crops_per_image`` boxes per view (absolute x, y, w, h), resizes
each to every view's size with antialiasing, mirrors where flagged, and returns
uint8 CHW per view. With one crop per image and one view the decoder only
decodes the region of interest (on the CPU its pixels equal the full decode's).
Without CUDA (``device_id=None``) everything runs on the CPU; with a GPU the
decoder is DALI's "mixed" one and the crops come back on that GPU.

Usage (stage 1 renders cached boxes at every teacher's size; stage 2 at the
student's, and online also at every teacher's)::

    renderer = DaliCropRenderer([View(224, "bicubic")], batch_size=64, num_threads=4, device_id=None)
    (crops,) = renderer.render(files, [boxes], flips).views  # boxes [n, 4] or [n, m, 4] per view

The pipeline is fed explicitly and run synchronously (no DALI prefetching), so a
call returns exactly the images it was given; callers that want to overlap
rendering with compute run it in a background thread (as stage 2's loader
does). Sample ids are fed with the images and come back out, so callers can
assert that nothing was reordered.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
import torch
import nvidia.dali.fn as fn
import nvidia.dali.types as types
from nvidia.dali import pipeline_def
from nvidia.dali.plugin.pytorch import feed_ndarray

from common.errors import PipelineError, cause_text
from common.images import ImageError, open_image
from common.render import Rendered, View, check_frame, resize_mode

_INTERP = {"bilinear": types.INTERP_LINEAR, "bicubic": types.INTERP_CUBIC, "nearest": types.INTERP_NN}


def device_id_for(runtime) -> int | None:
    """DALI's ``device_id`` for a :class:`~common.runtime.Runtime`: None (DALI's CPU backend) off CUDA,
    else the runtime's GPU ("cuda" without an index means the current device, which the runtime has set)."""
    if not runtime.is_cuda:
        return None
    return runtime.device.index if runtime.device.index is not None else torch.cuda.current_device()


def read_encoded(path: str | os.PathLike) -> np.ndarray:
    """The file's bytes as a uint8 array (what DALI's decoders take)."""
    data = np.fromfile(path, dtype=np.uint8)
    if data.size == 0:
        raise ImageError(path, "zero-byte file")
    return data


def decode_failure(paths: Sequence[str | os.PathLike], error: Exception) -> PipelineError:
    """The user-facing error for a failed DALI run, whose message names no file: the first file of
    the batch that Pillow cannot decode either (an ImageError naming it), else the batch itself."""
    for path in paths:
        try:
            open_image(path)
        except ImageError as bad:
            return bad
    return PipelineError(
        f"DALI could not decode the {len(paths)} images starting with {paths[0]} ({cause_text(error)}) although "
        "Pillow decodes each of them; use the torch loader (loader = \"torch\") for this data"
    )


def _crop_pipeline(views: list[View], batch_size: int, num_threads: int, device_id: int | None, m: int):
    """The DALI graph; external sources: encoded [bytes], boxes{v} [m, 4] per view, flips [m], sample_ids [m]."""
    decode_kwargs = {"device": "cpu", "output_type": types.RGB}
    if device_id is not None:
        # The mixed decoder's default chroma upsampling differs from libjpeg's (which PIL
        # and DALI's CPU decoder use); match it so GPU and CPU crops agree.
        decode_kwargs.update(device="mixed", jpeg_fancy_upsampling=True)

    @pipeline_def(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id,
        exec_pipelined=False,  # synchronous: one run() = exactly the fed batch
        exec_async=False,
        prefetch_queue_depth=1,
    )
    def pipeline():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        boxes = [fn.external_source(name=f"boxes{v}", dtype=types.INT32, ndim=2) for v in range(len(views))]
        flips = fn.external_source(name="flips", dtype=types.INT32, ndim=1)
        sample_ids = fn.external_source(name="sample_ids", dtype=types.INT64, ndim=1)
        shape = fn.peek_image_shape(encoded)  # (H, W, C) after EXIF orientation
        # Slice arguments are in DALI's default "WH" axis order: start = (x, y), shape = (w, h).
        if m == 1 and len(views) == 1:
            regions = [[fn.decoders.image_slice(encoded, start=boxes[0][0, 0:2], shape=boxes[0][0, 2:4],
                                                **decode_kwargs)]]
        else:  # one full decode shared by every crop of every view
            image = fn.decoders.image(encoded, **decode_kwargs)
            regions = [[fn.slice(image, start=b[j, 0:2], shape=b[j, 2:4], axis_names="WH") for j in range(m)]
                       for b in boxes]
        crops = []
        for view, view_regions in zip(views, regions):
            interp = _INTERP[resize_mode(view.interpolation)]
            resize_kwargs = {"antialias": True} if interp != types.INTERP_NN else {}
            for j, region in enumerate(view_regions):
                region = fn.resize(region, resize_x=view.size, resize_y=view.size, interp_type=interp, **resize_kwargs)
                # With no mean/std this is only mirror + HWC->CHW, staying uint8.
                crops.append(fn.crop_mirror_normalize(region, dtype=types.UINT8, output_layout="CHW",
                                                      mirror=flips[j]))
        return (*crops, sample_ids, shape)

    pipe = pipeline()
    pipe.build()
    return pipe


class DaliCropRenderer:
    """Renders crops of encoded images with DALI; see the module docstring.

    ``batch_size`` is the most *images* per DALI run (each gives
    ``crops_per_image`` crops per view); ``render`` splits longer inputs and
    reads the files of a run on ``num_threads`` threads (cheap, but slow on
    network filesystems if done one by one). Thread-safe: runs are serialised.
    """

    kind = "dali"

    def __init__(
        self,
        views: Sequence[View],
        batch_size: int = 64,
        num_threads: int = 2,
        device_id: int | None = None,
        crops_per_image: int = 1,
    ):
        self.views = [View(*v) for v in views]
        if not self.views or min(v.size for v in self.views) < 1 or batch_size < 1 or crops_per_image < 1:
            raise ValueError("at least one view; sizes, batch_size and crops_per_image must be >= 1")
        self.batch_size = batch_size
        self.crops_per_image = crops_per_image
        self.device = torch.device("cpu") if device_id is None else torch.device("cuda", device_id)
        self._pipe = _crop_pipeline(self.views, batch_size, max(1, num_threads), device_id, crops_per_image)
        self._lock = threading.Lock()
        self._readers = ThreadPoolExecutor(max(1, num_threads), thread_name_prefix="read")

    def __call__(self, files, boxes, flips, frames=None) -> list[torch.Tensor]:
        """The views only; see :meth:`render`."""
        return self.render(files, boxes, flips, frames).views

    def render(self, files: Sequence[str | os.PathLike], boxes, flips, frames=None, sample_ids=None) -> Rendered:
        """uint8 [n*m, 3, S_v, S_v] crops of ``files`` per view, on the renderer's device.

        ``boxes``: one int [n, 4] (m = 1) or [n, m, 4] per view, x, y, w, h in the
        EXIF-oriented frame; ``flips``: [n] or [n, m], 1 = mirror; ``frames``: the
        manifest's (width, height) per image, checked when given. ``sample_ids``
        [n, m] travel through DALI and come back beside the crops for the caller to
        compare; without them the order is checked here. A box outside its image is an error.
        """
        n, m = len(files), self.crops_per_image
        # DALI's external sources take C-contiguous rows of their declared dtypes
        boxes = [np.ascontiguousarray(b, dtype=np.int32).reshape(n, m, 4) for b in boxes]
        flips = np.ascontiguousarray(flips, dtype=np.int32).reshape(n, m)
        fed_ids = np.arange(n * m, dtype=np.int64).reshape(n, m) if sample_ids is None else \
            np.ascontiguousarray(sample_ids, dtype=np.int64).reshape(n, m)
        parts, ids = [], []
        for start in range(0, n, self.batch_size):
            rows = slice(start, start + self.batch_size)
            batch_files = list(files[rows])
            encoded = list(self._readers.map(read_encoded, batch_files))
            try:
                out, image_sizes = self.render_encoded(encoded, [b[rows] for b in boxes], flips[rows], fed_ids[rows])
            except RuntimeError as e:  # DALI's errors are RuntimeErrors that name no file
                raise decode_failure(batch_files, e) from e
            if frames is not None:
                for path, size, frame in zip(batch_files, image_sizes.tolist(), frames[rows]):
                    check_frame(path, size, frame)
            if sample_ids is None and not torch.equal(out.sample_ids, torch.from_numpy(fed_ids[rows].reshape(-1))):
                raise RuntimeError("DALI returned crops in a different order than they were fed")
            parts.append(out.views)
            ids.append(out.sample_ids)
        if not parts:
            return Rendered([torch.empty((0, 3, v.size, v.size), dtype=torch.uint8, device=self.device)
                             for v in self.views], torch.empty(0, dtype=torch.int64))
        return Rendered([torch.cat(p) for p in zip(*parts)], torch.cat(ids))

    def render_encoded(self, encoded: Sequence[np.ndarray], boxes, flips, sample_ids) -> tuple[Rendered, torch.Tensor]:
        """One DALI run over 1..``batch_size`` images, as :meth:`render` splits and prepares them.

        ``encoded``: n uint8 arrays (file bytes); ``boxes`` one int32 [n, m, 4] per view;
        ``flips`` int32 [n, m]; ``sample_ids`` int64 [n, m], returned flattened beside the crops.
        Returns the crops and int64 [n, 2] (CPU): (width, height) of each image after EXIF orientation.
        """
        n, m = len(encoded), self.crops_per_image
        with self._lock:
            self._pipe.feed_input("encoded", list(encoded))
            for v, view_boxes in enumerate(boxes):
                self._pipe.feed_input(f"boxes{v}", list(view_boxes))
            self._pipe.feed_input("flips", list(flips))
            self._pipe.feed_input("sample_ids", list(sample_ids))
            outputs = self._pipe.run()
            # Copy out before the next run reuses DALI's buffers. Outputs: view-major, crop j within.
            views = [torch.stack([self._to_torch(outputs[v * m + j]) for j in range(m)], dim=1)
                     .reshape(n * m, 3, view.size, view.size) for v, view in enumerate(self.views)]
            ids = torch.from_numpy(np.array(outputs[-2].as_tensor()))
            shapes = np.array(outputs[-1].as_tensor())
        return Rendered(views, ids.reshape(n * m)), torch.from_numpy(shapes[:, [1, 0]].astype(np.int64))

    def _to_torch(self, tensor_list) -> torch.Tensor:
        dense = tensor_list.as_tensor()
        if self.device.type == "cpu":
            return torch.from_numpy(np.array(dense))
        out = torch.empty(dense.shape(), dtype=torch.uint8, device=self.device)
        # On torch's current stream, so later work on that stream sees the copy.
        feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(self.device))
        return out
