"""Crop rendering with NVIDIA DALI: encoded image + boxes + flips -> uint8 crops.

The DALI twin of ``common.render``: same contract, same frame, close pixels.
For each image it decodes once (EXIF orientation applied, as PIL's
``exif_transpose`` does, so boxes drawn in the manifest's frame land on the same
pixels), cuts ``crops_per_image`` boxes (absolute x, y, w, h), resizes each to
``size`` x ``size`` with antialiasing, mirrors where flagged, and returns uint8
CHW. With one crop per image the decoder only decodes the region of interest.
Without CUDA (``device_id=None``) everything runs on the CPU; with a GPU the
decoder is DALI's "mixed" one and the crops come back on that GPU.

Usage (stage 1 renders cached boxes at a teacher's size; stage 2 at the student's)::

    renderer = DaliCropRenderer(size=224, interpolation="bicubic", batch_size=64,
                                num_threads=4, device_id=None)
    crops = renderer.render(files, boxes, flips)  # boxes [n, 4] or [n, m, 4]

The pipeline is fed explicitly and run synchronously (no DALI prefetching), so a
call returns exactly the images it was given; callers that want to overlap
rendering with compute run it in a background thread (as stage 2's loader
does). Sample ids are fed with the images and come back out, so callers can
assert that nothing was reordered.
"""
from __future__ import annotations

import os
import threading
from typing import NamedTuple, Sequence

import numpy as np
import torch
import nvidia.dali.fn as fn
import nvidia.dali.types as types
from nvidia.dali import pipeline_def
from nvidia.dali.plugin.pytorch import feed_ndarray

from common.errors import PipelineError, cause_text
from common.images import ImageError, open_image
from common.render import resize_mode

_INTERP = {"bilinear": types.INTERP_LINEAR, "bicubic": types.INTERP_CUBIC, "nearest": types.INTERP_NN}


class RenderedCrops(NamedTuple):
    crops: torch.Tensor  # uint8 [n*m, 3, S, S], image-major: all m crops of image 0, then image 1...
    sample_ids: torch.Tensor  # int64 [n*m] (CPU), as fed
    image_sizes: torch.Tensor  # int64 [n, 2] (CPU): (width, height) of each image after EXIF orientation


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


def _crop_pipeline(size: int, interpolation: str, batch_size: int, num_threads: int, device_id: int | None, m: int):
    """The DALI graph; external sources: encoded [bytes], boxes [m, 4], flips [m], sample_ids [m]."""
    interp = _INTERP[resize_mode(interpolation)]
    decode_kwargs = {"device": "cpu", "output_type": types.RGB}
    if device_id is not None:
        # The mixed decoder's default chroma upsampling differs from libjpeg's (which PIL
        # and DALI's CPU decoder use); match it so GPU and CPU crops agree.
        decode_kwargs.update(device="mixed", jpeg_fancy_upsampling=True)
    resize_kwargs = {"antialias": True} if interp != types.INTERP_NN else {}

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
        boxes = fn.external_source(name="boxes", dtype=types.INT32, ndim=2)
        flips = fn.external_source(name="flips", dtype=types.INT32, ndim=1)
        sample_ids = fn.external_source(name="sample_ids", dtype=types.INT64, ndim=1)
        shape = fn.peek_image_shape(encoded)  # (H, W, C) after EXIF orientation
        # Slice arguments are in DALI's default "WH" axis order: start = (x, y), shape = (w, h).
        if m == 1:
            views = [fn.decoders.image_slice(encoded, start=boxes[0, 0:2], shape=boxes[0, 2:4], **decode_kwargs)]
        else:  # one full decode shared by the m crops
            image = fn.decoders.image(encoded, **decode_kwargs)
            views = [fn.slice(image, start=boxes[j, 0:2], shape=boxes[j, 2:4], axis_names="WH") for j in range(m)]
        crops = []
        for j, view in enumerate(views):
            view = fn.resize(view, resize_x=size, resize_y=size, interp_type=interp, **resize_kwargs)
            # With no mean/std this is only mirror + HWC->CHW, staying uint8.
            crops.append(fn.crop_mirror_normalize(view, dtype=types.UINT8, output_layout="CHW", mirror=flips[j]))
        return (*crops, sample_ids, shape)

    pipe = pipeline()
    pipe.build()
    return pipe


class DaliCropRenderer:
    """Renders crops of encoded images with DALI; see the module docstring.

    ``batch_size`` is the most *images* per DALI run (each gives
    ``crops_per_image`` crops); ``render`` splits longer inputs. Thread-safe:
    runs are serialised.
    """

    def __init__(
        self,
        size: int,
        interpolation: str = "bilinear",
        batch_size: int = 64,
        num_threads: int = 2,
        device_id: int | None = None,
        crops_per_image: int = 1,
    ):
        if size < 1 or batch_size < 1 or crops_per_image < 1:
            raise ValueError("size, batch_size and crops_per_image must be >= 1")
        self.size = size
        self.batch_size = batch_size
        self.crops_per_image = crops_per_image
        self.device = torch.device("cpu") if device_id is None else torch.device("cuda", device_id)
        self._pipe = _crop_pipeline(size, interpolation, batch_size, max(1, num_threads), device_id, crops_per_image)
        self._lock = threading.Lock()

    def render(self, files: Sequence[str | os.PathLike], boxes, flips) -> torch.Tensor:
        """uint8 [n*m, 3, S, S] crops of ``files`` on the renderer's device.

        ``boxes``: int [n, 4] (m = 1) or [n, m, 4] x, y, w, h in the EXIF-oriented
        frame; ``flips``: [n] or [n, m], 1 = mirror. A box outside its image is an error.
        """
        m = self.crops_per_image
        boxes = np.asarray(boxes, dtype=np.int32).reshape(len(files), m, 4)
        flips = np.asarray(flips).reshape(len(files), m)
        sample_ids = np.arange(len(files) * m, dtype=np.int64).reshape(len(files), m)
        parts = []
        for start in range(0, len(files), self.batch_size):
            rows = slice(start, start + self.batch_size)
            encoded = [read_encoded(f) for f in files[rows]]
            try:
                out = self.render_encoded(encoded, boxes[rows], flips[rows], sample_ids[rows])
            except RuntimeError as e:  # DALI's errors are RuntimeErrors that name no file
                raise decode_failure(files[rows], e) from e
            if not torch.equal(out.sample_ids, torch.from_numpy(sample_ids[rows].reshape(-1))):
                raise RuntimeError("DALI returned crops in a different order than they were fed")
            parts.append(out.crops)
        if not parts:
            return torch.empty((0, 3, self.size, self.size), dtype=torch.uint8, device=self.device)
        return torch.cat(parts)

    def render_encoded(self, encoded: Sequence[np.ndarray], boxes, flips, sample_ids) -> RenderedCrops:
        """One DALI run over at most ``batch_size`` images.

        ``encoded``: n uint8 arrays (file bytes); ``boxes`` [n, m, 4]; ``flips``
        [n, m]; ``sample_ids`` [n, m] int64, returned flattened beside the crops.
        """
        n, m = len(encoded), self.crops_per_image
        if not 1 <= n <= self.batch_size:
            raise ValueError(f"render_encoded takes 1..{self.batch_size} images, got {n}")
        boxes = np.ascontiguousarray(boxes, dtype=np.int32).reshape(n, m, 4)
        flips = np.ascontiguousarray(flips, dtype=np.int32).reshape(n, m)
        sample_ids = np.ascontiguousarray(sample_ids, dtype=np.int64).reshape(n, m)
        with self._lock:
            self._pipe.feed_input("encoded", list(encoded))
            self._pipe.feed_input("boxes", list(boxes))
            self._pipe.feed_input("flips", list(flips))
            self._pipe.feed_input("sample_ids", list(sample_ids))
            outputs = self._pipe.run()
            # Copy out before the next run reuses DALI's buffers.
            crops = torch.stack([self._to_torch(outputs[j]) for j in range(m)], dim=1)
            ids = torch.from_numpy(np.array(outputs[m].as_tensor()))
            shapes = np.array(outputs[m + 1].as_tensor())
        return RenderedCrops(
            crops=crops.reshape(n * m, 3, self.size, self.size),
            sample_ids=ids.reshape(n * m),
            image_sizes=torch.from_numpy(shapes[:, [1, 0]].astype(np.int64)),
        )

    def _to_torch(self, tensor_list) -> torch.Tensor:
        dense = tensor_list.as_tensor()
        if self.device.type == "cpu":
            return torch.from_numpy(np.array(dense))
        out = torch.empty(dense.shape(), dtype=torch.uint8, device=self.device)
        # On torch's current stream, so later work on that stream sees the copy.
        feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(self.device))
        return out
