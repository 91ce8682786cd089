"""The DALI rendering backend of stage 2's :class:`~stage2_student_distill.loaders.Loader`.

File bytes are read in a small thread pool (cheap, but slow on network
filesystems if done one by one); decoding the region of interest, resizing,
mirroring and the HWC->CHW layout run in DALI (``common.dali_crops``): on the
CPU without CUDA, with the "mixed" GPU decoder when the runtime is on CUDA, in
which case the crops arrive already on the device. The Loader runs this a few
batches ahead in a background thread, compares the returned sample ids with its
plan and normalises on the device, exactly as for the PyTorch backend.

Importing this module raises ImportError when DALI is not installed
(``common.loader_kind`` decides which backend a run uses).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from common.dali_crops import DaliCropRenderer, decode_failure, device_id_for, read_encoded
from common.manifest import ConfinedPaths
from stage2_student_distill.loaders import check_decoded_size


class DaliBackend:
    kind = "dali"

    def __init__(self, manifest, size: int, interpolation: str, images_per_batch: int, crops_per_image: int, runtime):
        self.manifest = manifest
        self.path_of = ConfinedPaths(manifest)
        threads = max(1, runtime.num_workers)
        self.renderer = DaliCropRenderer(size, interpolation, images_per_batch, threads, device_id_for(runtime),
                                         crops_per_image)
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="read")

    def render(self, image_ids, boxes, flips, sample_ids) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 [n*m, 3, S, S] (CPU, or the GPU with CUDA) and the sample ids DALI carried through."""
        paths = [self.path_of(i) for i in image_ids]
        encoded = list(self.pool.map(read_encoded, paths))
        try:
            out = self.renderer.render_encoded(encoded, boxes, flips, sample_ids)
        except RuntimeError as e:  # DALI's errors are RuntimeErrors that name no file
            raise decode_failure(paths, e) from e
        for path, image_id, size in zip(paths, image_ids, out.image_sizes.tolist()):
            check_decoded_size(path, tuple(size), self.manifest, int(image_id))
        return out.crops, out.sample_ids
