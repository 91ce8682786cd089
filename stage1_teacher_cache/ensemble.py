"""The ensemble rule of MEAL V2: the mean of the teachers' softmax probabilities.

Each teacher gets the same crops rendered at its own size and normalised with
its own mean/std; logits are upcast to float32 before the softmax so that bf16
autocast only changes the matmuls, not the probabilities we store.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from common.render import normalize
from common.runtime import Runtime
from stage1_teacher_cache.teachers import Teacher

RULE = "mean_softmax"


@torch.inference_mode()
def teacher_probs(teachers: Sequence[Teacher], views: Sequence[torch.Tensor], runtime: Runtime,
                  temperature: float = 1.0) -> torch.Tensor:
    """float32 [T, B, num_classes]: softmax(logits / T) of each teacher on its uint8 views [B, 3, S_t, S_t]."""
    out = []
    for teacher, pixels in zip(teachers, views):
        if runtime.is_cuda and pixels.device.type == "cpu":
            pixels = pixels.pin_memory()  # lets the copy in normalize() run asynchronously
        x = normalize(pixels, teacher.preprocess.mean, teacher.preprocess.std,
                      device=runtime.device, memory_format=runtime.memory_format())
        with runtime.autocast():
            logits = teacher.model(x)
        out.append(torch.softmax(logits.float() / temperature, dim=-1))
    return torch.stack(out)


def ensemble_topk(probs: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (sorted, most probable first) of the mean over teachers: (index int64, prob float32) [B, k]."""
    values, index = probs.mean(0).topk(k, dim=-1, sorted=True)
    return index.cpu().numpy(), values.cpu().numpy()
