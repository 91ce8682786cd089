"""Top-1 / top-5 / cross-entropy of a model on a manifest (centre crops, every image once)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common.config import Config
from common.manifest import Manifest, load_manifest
from common.models import create_model, read_weights
from common.runtime import Runtime, build_runtime
from stage2_student_distill.checkpoint import RunError
from stage2_student_distill.loaders import build_loader


@torch.no_grad()
def evaluate(model: nn.Module, loader, runtime: Runtime) -> dict[str, float]:
    """{"top1", "top5" (percent), "loss" (mean CE), "images"} over the labeled images.

    Images labeled -1 are skipped. Sums stay on the device until the end (one
    sync), and are summed over ranks under torchrun, so every rank returns
    the whole-dataset numbers. Top-5 is top-min(5, K) for fewer classes.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=runtime.device)  # top1 hits, top5 hits, loss, count
    for batch in loader.epoch(0):
        with runtime.autocast():
            logits = model(batch.images)
        # Unlabeled rows are masked, not dropped: boolean indexing would wait for the GPU every batch.
        logits, labels = logits.float(), batch.labels
        labeled = labels >= 0
        hits = (logits.topk(min(5, logits.shape[-1]), dim=-1).indices == labels[:, None]) & labeled[:, None]
        sums += torch.stack(
            [
                hits[:, 0].sum(),
                hits.any(-1).sum(),
                F.cross_entropy(logits, labels, ignore_index=-1, reduction="sum"),
                labeled.sum(),
            ]
        ).double()
    if runtime.distributed:
        torch.distributed.all_reduce(sums)
    model.train(was_training)
    top1, top5, loss, count = sums.tolist()
    if count == 0:
        raise RunError("the evaluation manifest has no labeled images (all labels are -1); nothing to score")
    return {"top1": 100.0 * top1 / count, "top5": 100.0 * top5 / count, "loss": loss / count, "images": int(count)}


def check_classes(meta: dict[str, Any], manifest: Manifest, source: str) -> None:
    """Refuse a model whose classes are not the manifest's (count, then names)."""
    if int(meta["num_classes"]) != manifest.num_classes:
        raise RunError(
            f"{source} has {meta['num_classes']} classes but manifest {manifest.path} has {manifest.num_classes}"
        )
    names = meta.get("class_names")
    if names is not None and tuple(names) != manifest.class_names:
        raise RunError(
            f"{source} was trained on classes {list(names)[:5]}... but manifest {manifest.path} has "
            f"{list(manifest.class_names)[:5]}...; the class order must match"
        )


def run_evaluate(checkpoint: str | Path, manifest: str | Path, cfg: Config) -> dict[str, Any]:
    """Evaluate a `pipeline distill/train` checkpoint (model, classes, preprocessing from its meta)."""
    _, meta = read_weights(checkpoint)
    if "model" not in meta or "num_classes" not in meta:
        raise RunError(
            f"{checkpoint}: has no model metadata (model name, classes); evaluate checkpoints written by "
            "`pipeline distill` or `pipeline train` (RUN/best.pt or RUN/last.pt)"
        )
    runtime = build_runtime(cfg.runtime)
    val = load_manifest(manifest, cfg.data.data_root or None)
    check_classes(meta, val, str(checkpoint))
    model, preprocess = create_model(meta["model"], int(meta["num_classes"]), weights=checkpoint)
    model.to(runtime.device, memory_format=runtime.memory_format())
    loader = build_loader(
        cfg.optim.loader,
        manifest=val,
        mode="eval",
        preprocess=preprocess,
        batch_size=cfg.optim.eval_batch_size,
        runtime=runtime,
    )
    scores = evaluate(model, loader, runtime)
    return {"checkpoint": str(checkpoint), "model": meta["model"], "is_main": runtime.is_main, **scores}
