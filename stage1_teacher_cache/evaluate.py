"""Measure each teacher and the ensemble before paying for the cache.

A teacher with the wrong weights, the wrong normalisation or a different class
order than the manifest still produces confident soft labels -- they are just
wrong, and nothing downstream would notice. A centre-crop top-1 on a labelled
validation manifest catches all three in minutes.
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
from stage1_teacher_cache.teachers import Teacher
from stage1_teacher_cache.views import Renderer, batches


class TeacherCheckError(PipelineError):
    """A teacher is too close to chance on the validation set to be trusted."""


def evaluate_teachers(teachers: Sequence[Teacher], manifest: Manifest, runtime: Runtime, render: Renderer,
                      batch_size: int, temperature: float) -> dict[str, Any]:
    """Top-1/top-5 of every teacher (its own centre crop) and of the ensemble on the labelled images.

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
    acc = (hits / len(ids)).tolist()
    return {
        "manifest": {"hash": manifest.content_hash, "path": str(manifest.path), "num_images": int(len(ids))},
        "crop": "centre (each teacher's crop_pct)",
        "teachers": {t.name: {"top1": a[0], "top5": a[1]} for t, a in zip(teachers, acc)},
        "ensemble": {"top1": acc[-1][0], "top5": acc[-1][1]},
        "chance_top1": 1.0 / manifest.num_classes,
    }


def count_hits(teachers: Sequence[Teacher], manifest: Manifest, ids: np.ndarray, runtime: Runtime,
               render: Renderer, batch_size: int, temperature: float) -> np.ndarray:
    """int64 [teachers + 1, 2]: top-1 and top-5 hits of each teacher, then of the ensemble, on images ``ids``."""
    labels = torch.as_tensor(manifest.labels[ids].astype(np.int64), device=runtime.device)
    k5 = min(5, manifest.num_classes)
    pres = [t.preprocess for t in teachers]
    path_of = ConfinedPaths(manifest)

    def centre_crops(group: np.ndarray) -> list[torch.Tensor]:
        sizes = [(int(manifest.widths[i]), int(manifest.heights[i])) for i in group]
        boxes = [np.array([[centre_box(w, h, p.crop_pct)] for w, h in sizes]) for p in pres]  # [n, 1, 4] each
        return render([path_of(i) for i in group], boxes, np.zeros((len(group), 1), np.uint8))

    groups = [ids[i : i + batch_size] for i in range(0, len(ids), batch_size)]
    views = prefetch(centre_crops, groups, runtime.num_workers, depth=2 * runtime.num_workers + 2)
    views = tqdm(views, total=len(groups), desc="evaluating teachers", unit="batch", disable=not runtime.progress)
    hits = torch.zeros(len(teachers) + 1, 2, dtype=torch.int64, device=runtime.device)
    done = 0
    for batch in batches(views, batch_size):
        probs = teacher_probs(teachers, batch, runtime, temperature)
        probs = torch.cat([probs, probs.mean(0, keepdim=True)])
        target = labels[done : done + probs.shape[1]]
        top = probs.topk(k5, dim=-1).indices == target[None, :, None]
        hits[:, 0] += top[..., 0].sum(-1)
        hits[:, 1] += top.any(-1).sum(-1)
        done += probs.shape[1]
    return hits.cpu().numpy()


def format_eval_table(result: dict[str, Any]) -> str:
    rows = [*result["teachers"].items(), ("ensemble (mean softmax)", result["ensemble"])]
    width = max(len(name) for name, _ in rows) + 2
    lines = [f"{'teacher':<{width}}{'top-1':>8}{'top-5':>8}   on {result['manifest']['num_images']} images"]
    lines += [f"{name:<{width}}{r['top1']:>8.2%}{r['top5']:>8.2%}" for name, r in rows]
    lines.append(f"{'chance':<{width}}{result['chance_top1']:>8.2%}")
    return "\n".join(lines)


def check_teachers(result: dict[str, Any], min_top1_over_chance: float) -> None:
    """Stop when any teacher is below ``min_top1_over_chance`` x chance, naming it and the likely causes."""
    chance = result["chance_top1"]
    floor = min_top1_over_chance * chance
    weak = {name: r["top1"] for name, r in result["teachers"].items() if r["top1"] < floor}
    if weak:
        listed = ", ".join(f"{name} (top-1 {top1:.2%})" for name, top1 in weak.items())
        raise TeacherCheckError(
            f"teacher check failed: {listed} below {min_top1_over_chance:g} x chance = {floor:.2%} "
            f"on {result['manifest']['path']}. Likely causes: wrong weights for this dataset (--teacher-weights), "
            "wrong normalisation or input size (check the teacher's preprocessing, --input-size), or a class order "
            "that differs from the one the teacher was trained with. Lower teacher_cache.min_top1_over_chance "
            "only if the teacher is known to be weak."
        )
