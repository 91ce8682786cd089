"""Measure each teacher and the ensemble before paying for the cache.

A teacher with the wrong weights, the wrong normalisation or a different class
order than the manifest still produces confident soft labels -- they are just
wrong, and nothing downstream would notice. A centre-crop top-1 on a labelled
validation manifest catches all three in minutes.

The same pass says whether the ensemble is worth distilling from. MEAL V2 only
pays when the teachers know more than the labels, and a mean of softmaxes is
not always better than its best member: a weak, confident teacher drags it
down. Each leave-one-out ensemble (the mean softmax of the other teachers) is
scored from the probabilities already computed, so a teacher that lowers the
ensemble is named before the cache is paid for (teacher_eval.py, docs/teachers.md).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from tqdm import tqdm

from common.crops import centre_box
from common.distributed import all_gather_json, fail_together
from common.errors import PipelineError
from common.manifest import ConfinedPaths, Manifest
from common.prefetch import prefetch
from common.runtime import Runtime
from stage1_teacher_cache.ensemble import teacher_probs
from stage1_teacher_cache.teacher_eval import percent, summarize_hits
from stage1_teacher_cache.teachers import Teacher
from stage1_teacher_cache.views import Renderer, batches


class TeacherCheckError(PipelineError):
    """A teacher is too close to chance on the validation set to be trusted."""


def evaluate_teachers(teachers: Sequence[Teacher], manifest: Manifest, runtime: Runtime, render: Renderer,
                      batch_size: int, temperature: float) -> dict[str, Any]:
    """Top-1/top-5 of every teacher (its own centre crop), of the ensemble and of each leave-one-out
    ensemble on the labelled images.

    Under torchrun each rank scores a strided share and the hit counts are
    summed, so every rank returns the same numbers (and reaches the same
    verdict) and no rank waits in a collective while another evaluates alone.
    """
    ids = np.flatnonzero(manifest.labels >= 0)
    if not len(ids):
        raise TeacherCheckError(f"evaluation manifest {manifest.path} has no labelled images; top-1 cannot be measured")
    with fail_together(runtime):  # a bad image on one rank stops every rank with its message
        hits = count_hits(teachers, manifest, ids[runtime.rank :: runtime.world_size], runtime, render,
                          batch_size, temperature)
    hits = np.sum(all_gather_json(runtime, hits.tolist()), axis=0)
    return summarize_hits([t.name for t in teachers], hits, len(ids), manifest.num_classes, {
        "hash": manifest.content_hash, "path": str(manifest.path), "num_images": int(len(ids))})


def count_hits(teachers: Sequence[Teacher], manifest: Manifest, ids: np.ndarray, runtime: Runtime,
               render: Renderer, batch_size: int, temperature: float) -> np.ndarray:
    """int64 [rows, 2]: the top-1 and top-5 hits of ``hits_of_probs``, summed over images ``ids``."""
    labels = torch.as_tensor(manifest.labels[ids].astype(np.int64), device=runtime.device)
    k5 = min(5, manifest.num_classes)
    path_of = ConfinedPaths(manifest)

    def centre_crops(group: np.ndarray) -> list[torch.Tensor]:
        sizes = [(int(manifest.widths[i]), int(manifest.heights[i])) for i in group]
        boxes = [np.array([[centre_box(w, h, t.preprocess.crop_pct)] for w, h in sizes]) for t in teachers]  # [n, 1, 4]
        return render([path_of(i) for i in group], boxes, np.zeros((len(group), 1), np.uint8), sizes)

    groups = [ids[i : i + batch_size] for i in range(0, len(ids), batch_size)]
    views = prefetch(centre_crops, groups, runtime.num_workers, depth=2 * runtime.num_workers + 2)
    views = tqdm(views, total=len(groups), desc="evaluating teachers", unit="batch", disable=not runtime.progress)
    hits = torch.zeros(2 * len(teachers) + 1 if len(teachers) > 1 else 2, 2, dtype=torch.int64, device=runtime.device)
    done = 0
    for batch in batches(views, batch_size):
        probs = teacher_probs(teachers, batch, runtime, temperature)
        hits += hits_of_probs(probs, labels[done : done + probs.shape[1]], k5)
        done += probs.shape[1]
    return hits.cpu().numpy()


def hits_of_probs(probs: torch.Tensor, target: torch.Tensor, k5: int) -> torch.Tensor:
    """int64 [rows, 2]: top-1 and top-``k5`` hits on labels ``target`` [B] of each teacher's
    probabilities ``probs`` [T, B, classes], then of their mean, then (if T > 1) of the mean without
    teacher 0, 1, ..., T-1 -- derived from the same probabilities, no extra forward pass."""
    T = probs.shape[0]
    rows = [probs, probs.mean(0, keepdim=True)]
    if T > 1:
        rows.append((probs.sum(0, keepdim=True) - probs) / (T - 1))  # row t: the ensemble without teacher t
    top = torch.cat(rows).topk(k5, dim=-1).indices == target[None, :, None]
    return torch.stack([top[..., 0].sum(-1), top.any(-1).sum(-1)], dim=-1)


def check_teachers(result: dict[str, Any], min_top1_over_chance: float) -> None:
    """Stop when any teacher is below ``min_top1_over_chance`` x chance, naming it and the likely causes."""
    floor = min_top1_over_chance * result["chance_top1"]
    weak = {name: r["top1"] for name, r in result["teachers"].items() if r["top1"] < floor}
    if weak:
        listed = ", ".join(f"{name} (top-1 {percent(top1)})" for name, top1 in weak.items())
        raise TeacherCheckError(
            f"teacher check failed: {listed} below {min_top1_over_chance:g} x chance = {percent(floor)} "
            f"on {result['manifest']['path']}. Likely causes: wrong weights for this dataset (--teacher-weights), "
            "wrong normalisation or input size (check the teacher's preprocessing, --input-size), or a class order "
            "that differs from the one the teacher was trained with. Lower teacher_cache.min_top1_over_chance "
            "only if the teacher is known to be weak."
        )
