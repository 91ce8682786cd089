"""Stage 2's training loop, shared by `pipeline distill` and `pipeline train`.

``run_distill`` and ``run_train`` only assemble a ``Job`` (data, models,
objective); ``fit`` is the one loop both run, top to bottom. What differs is
the objective (losses.py): KL to the cached ensemble targets plus the MEAL V2
discriminator, or cross entropy to hard labels.

Reproducibility contract: the loader's epoch order and crops, the CutMix
draws and the global RNG (dropout, drop-path) are seeded from (seed, epoch,
step, rank); the learning rate is a pure function of (epoch, step). So
last.pt needs no RNG state, and ``--resume`` reproduces an uninterrupted
run's metrics exactly on the same machine.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from common.cache_format import CacheReader
from common.config import Config
from common.manifest import Manifest, load_manifest
from common.models import Preprocess, create_model, resolve_name
from common.runtime import Runtime, build_runtime, seed_everything
from stage2_student_distill.checkpoint import (
    RunError,
    load_training_state,
    prepare_run_dir,
    save_model,
    save_training_state,
    unwrap,
)
from stage2_student_distill.discriminator import Discriminator
from stage2_student_distill.evaluate import evaluate
from stage2_student_distill.loaders import build_loader
from stage2_student_distill.losses import DistillObjective, HardLabelObjective, cutmix
from stage2_student_distill.metrics_log import open_run_log
from stage2_student_distill.schedule import lr_factor, set_learning_rates

# Config tables whose values decide a run's result (checked on --resume).
DISTILL_TABLES = ("runtime", "data", "optim", "distill")
TRAIN_TABLES = ("runtime", "data", "crops", "optim", "train")


@dataclass
class Job:
    """Everything ``fit`` needs; assembled by ``run_distill`` / ``run_train``."""

    cfg: Config
    runtime: Runtime
    run_dir: Path
    resume: bool
    student: nn.Module  # on device; compiled and DDP-wrapped as configured
    discriminator: nn.Module | None  # on device, DDP-wrapped under torchrun
    objective: DistillObjective | HardLabelObjective
    train_loader: Any
    val_loader: Any
    meta: dict[str, Any]  # checkpoint metadata (model, classes, preprocess, ...)
    cutmix_prob: float = 0.0
    cutmix_alpha: float = 1.0


def fit(job: Job) -> dict[str, Any]:
    """Train ``job.student`` for the configured epochs; checkpoint every epoch and validate
    every ``optim.eval_every`` epochs and after the last (best.pt only moves on validated epochs)."""
    cfg, rt = job.cfg, job.runtime
    student = unwrap(job.student)
    optimizers = {
        "student": torch.optim.SGD(
            student.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay
        )
    }
    base_lrs = {"student": cfg.optim.lr}
    if job.discriminator is not None:
        # Its own optimizer and base lr: the schedule scales it, never replaces it.
        optimizers["discriminator"] = torch.optim.SGD(
            unwrap(job.discriminator).parameters(), lr=cfg.distill.disc_lr, momentum=cfg.optim.momentum
        )
        base_lrs["discriminator"] = cfg.distill.disc_lr
    lr_pairs = [(optimizers[name], base_lrs[name]) for name in optimizers]
    scaler = rt.grad_scaler()

    start_epoch, best_top1 = 0, -math.inf
    if job.resume:
        state = load_training_state(
            job.run_dir / "last.pt", model=student, discriminator=job.discriminator, optimizers=optimizers, scaler=scaler
        )
        if state["meta"].get("manifest_hash") != job.meta["manifest_hash"]:
            raise RunError(f"cannot resume {job.run_dir}: it was trained on a different manifest (content hash differs)")
        start_epoch, best_top1 = state["epoch"], state["best_top1"]
        if rt.is_main:
            print(f"resuming {job.run_dir} after epoch {start_epoch} (best top-1 {best_top1:.2f}%)", flush=True)
    metrics = open_run_log(job.run_dir, start_epoch, cfg.optim.log, write=rt.is_main)  # metrics.jsonl (+ TensorBoard)

    record: dict[str, Any] | None = None
    for epoch in range(start_epoch, cfg.optim.epochs):
        epoch_start = time.perf_counter()
        train = train_one_epoch(job, lr_pairs, scaler, epoch)
        validate = (epoch + 1) % cfg.optim.eval_every == 0 or epoch + 1 == cfg.optim.epochs
        val = evaluate(student, job.val_loader, rt) if validate else None
        record = {
            "epoch": epoch + 1,
            **{f"train_{name}": value for name, value in train["losses"].items()},
            # epochs without validation have no val_* keys (consumers filter on "val_top1")
            **({"val_top1": val["top1"], "val_top5": val["top5"], "val_loss": val["loss"]} if val else {}),
            "lr": cfg.optim.lr * train["lr_factor"],
            **({"disc_lr": cfg.distill.disc_lr * train["lr_factor"]} if job.discriminator is not None else {}),
            "img_per_s": train["img_per_s"],
            "time_s": time.perf_counter() - epoch_start,
        }
        if rt.is_main:
            meta = {**job.meta, "epoch": epoch + 1, **({"val_top1": val["top1"], "val_top5": val["top5"]} if val else {})}
            # Order matters for crash safety: last.pt is the commit point. A
            # crash before it re-runs this epoch on resume, and MetricsLog drops
            # the line of an epoch that last.pt does not cover.
            if val and val["top1"] > best_top1:
                save_model(job.run_dir / "best.pt", student, meta)
            metrics.append(record)
            save_training_state(
                job.run_dir / "last.pt",
                model=student,
                meta=meta,
                discriminator=job.discriminator,
                optimizers=optimizers,
                scaler=scaler,
                epoch=epoch + 1,
                best_top1=max(best_top1, val["top1"]) if val else best_top1,
            )
            print(summary_line(record, cfg.optim.epochs), flush=True)
        if val:
            best_top1 = max(best_top1, val["top1"])
        rt.barrier()
    return {
        "run_dir": str(job.run_dir),
        "epochs": cfg.optim.epochs,
        "best_top1": best_top1,
        "last": record,
        "is_main": rt.is_main,
    }


def train_one_epoch(job: Job, lr_pairs, scaler: torch.amp.GradScaler, epoch: int) -> dict[str, Any]:
    """One pass over ``job.train_loader``; loss sums stay on the device except on log steps."""
    cfg, rt, objective = job.cfg, job.runtime, job.objective
    job.student.train()
    if job.discriminator is not None:
        job.discriminator.train()
    seed_everything(int(np.random.SeedSequence([cfg.runtime.seed, epoch, rt.rank]).generate_state(1)[0]))
    steps = len(job.train_loader)
    # per-part loss * batch, then images; float64 so ImageNet-sized sums keep their digits
    sums = torch.zeros(len(objective.parts) + 1, dtype=torch.float64, device=rt.device)
    bar = tqdm(
        total=job.train_loader.num_samples_per_epoch, unit="img", disable=not rt.progress, leave=False,
        desc=f"epoch {epoch + 1}/{cfg.optim.epochs}", dynamic_ncols=True,
    )
    start = time.perf_counter()
    for step, batch in enumerate(job.train_loader.epoch(epoch)):
        set_learning_rates(lr_pairs, lr_factor(cfg.optim, epoch, step, steps))
        rng = np.random.default_rng([cfg.runtime.seed, epoch, step, rt.rank])
        images, targets = cutmix(batch.images, objective.targets(batch), job.cutmix_prob, job.cutmix_alpha, rng)

        with rt.autocast():
            logits = job.student(images)
        loss, parts = objective(logits, targets)  # float32, outside autocast
        scaler.scale(loss).backward()
        for optimizer, _ in lr_pairs:
            scaler.step(optimizer)
        scaler.update()
        for optimizer, _ in lr_pairs:
            optimizer.zero_grad(set_to_none=True)

        n = images.shape[0]
        sums[:-1] += parts * n
        sums[-1] += n
        bar.update(n)
        if (step + 1) % cfg.optim.log_every == 0:
            log_step(job, bar, sums, epoch, step, steps, lr_pairs[0][0].param_groups[0]["lr"], start)
    bar.close()
    elapsed = time.perf_counter() - start
    if rt.distributed:
        torch.distributed.all_reduce(sums)
    totals = sums.tolist()  # the epoch's one sync
    images_seen = max(totals[-1], 1.0)
    return {
        "losses": {name: value / images_seen for name, value in zip(objective.parts, totals[:-1])},
        "img_per_s": totals[-1] / max(elapsed, 1e-9),
        "lr_factor": lr_factor(cfg.optim, epoch, 0, steps),
    }


def log_step(job: Job, bar, sums: torch.Tensor, epoch: int, step: int, steps: int, lr: float, start: float) -> None:
    """Running means of this rank's losses: on the bar, or as a line when progress is off."""
    values = sums.tolist()
    means = {name: v / max(values[-1], 1.0) for name, v in zip(job.objective.parts, values[:-1])}
    if not all(math.isfinite(v) for v in means.values()):
        raise RunError(
            f"training diverged at epoch {epoch + 1} step {step + 1} (loss {means['loss']}); "
            f"lower the learning rate (--lr, now {job.cfg.optim.lr})"
        )
    text = " ".join(f"{name} {value:.4f}" for name, value in means.items()) + f" lr {lr:.3g}"
    if job.runtime.progress:
        bar.set_postfix_str(text, refresh=False)
    elif job.runtime.is_main:
        rate = values[-1] / max(time.perf_counter() - start, 1e-9)
        print(f"epoch {epoch + 1} step {step + 1}/{steps} {text} {rate:.0f} img/s", flush=True)


def summary_line(record: dict[str, Any], epochs: int) -> str:
    parts = " ".join(f"{k[len('train_'):]} {v:.4f}" for k, v in record.items() if k.startswith("train_"))
    val = (
        f"val top-1 {record['val_top1']:.2f}% top-5 {record['val_top5']:.2f}% loss {record['val_loss']:.4f}  "
        if "val_top1" in record else ""
    )
    return (
        f"epoch {record['epoch']}/{epochs}  train {parts}  {val}"
        f"lr {record['lr']:.3g}  {record['img_per_s']:.0f} img/s  {record['time_s']:.1f} s"
    )


def run_distill(cfg: Config) -> dict[str, Any]:
    """`pipeline distill`: train ``distill.student`` from a teacher cache (no teacher is loaded)."""
    d = cfg.distill
    _require(cfg, {"data.manifest": "--manifest", "data.val_manifest": "--val-manifest",
                   "distill.cache": "--cache", "distill.out": "--out"})
    runtime = build_runtime(cfg.runtime)
    manifest, val_manifest = _load_manifests(cfg)
    cache = CacheReader(d.cache, manifest_hash=manifest.content_hash, num_classes=manifest.num_classes)
    run_dir = prepare_run_dir(d.out, cfg.to_dict(), d.resume, DISTILL_TABLES, write=runtime.is_main)

    seed_everything(cfg.runtime.seed)  # same initial student (and discriminator) on every run and rank
    student, preprocess = create_model(
        d.student, manifest.num_classes, pretrained=d.pretrained,
        weights=d.student_weights or None, input_size=cfg.optim.img_size or None,
    )
    discriminator = Discriminator(manifest.num_classes) if d.discriminator else None
    student = _place(student, runtime, compile=runtime.compile)
    if discriminator is not None:
        discriminator = _place(discriminator, runtime, compile=False)
    train_loader, val_loader = _loaders(cfg, runtime, manifest, val_manifest, preprocess, mode="distill",
                                        cache=cache, crops_per_image=d.crops_per_image)
    meta = _meta("distill", d.student, preprocess, manifest)
    meta["cache"] = {"path": d.cache, "teachers": cache.attrs.get("teachers")}
    return fit(Job(
        cfg=cfg, runtime=runtime, run_dir=run_dir, resume=d.resume, student=student, discriminator=discriminator,
        objective=DistillObjective(discriminator), train_loader=train_loader, val_loader=val_loader, meta=meta,
        cutmix_prob=d.cutmix_prob, cutmix_alpha=d.cutmix_alpha,
    ))


def run_train(cfg: Config) -> dict[str, Any]:
    """`pipeline train`: hard-label training (baselines, and teachers for custom datasets)."""
    t = cfg.train
    _require(cfg, {"data.manifest": "--manifest", "data.val_manifest": "--val-manifest", "train.out": "--out"})
    runtime = build_runtime(cfg.runtime)
    manifest, val_manifest = _load_manifests(cfg)
    unlabeled = int((manifest.labels < 0).sum())
    if unlabeled:
        raise RunError(f"{manifest.path}: {unlabeled} images have no label (-1); `pipeline train` needs every label")
    run_dir = prepare_run_dir(t.out, cfg.to_dict(), t.resume, TRAIN_TABLES, write=runtime.is_main)

    seed_everything(cfg.runtime.seed)
    model, preprocess = create_model(
        t.model, manifest.num_classes, pretrained=t.pretrained,
        weights=t.weights or None, input_size=cfg.optim.img_size or None,
    )
    model = _place(model, runtime, compile=runtime.compile)
    train_loader, val_loader = _loaders(cfg, runtime, manifest, val_manifest, preprocess, mode="train",
                                        crops=cfg.crops)
    return fit(Job(
        cfg=cfg, runtime=runtime, run_dir=run_dir, resume=t.resume, student=model, discriminator=None,
        objective=HardLabelObjective(manifest.num_classes, t.label_smoothing),
        train_loader=train_loader, val_loader=val_loader, meta=_meta("train", t.model, preprocess, manifest),
    ))


def _require(cfg: Config, keys: dict[str, str]) -> None:
    for key, flag in keys.items():
        table, _, name = key.partition(".")
        if not getattr(getattr(cfg, table), name):
            raise RunError(f"missing {flag} (config key {key})")


def _load_manifests(cfg: Config) -> tuple[Manifest, Manifest]:
    root = cfg.data.data_root or None
    manifest, val_manifest = load_manifest(cfg.data.manifest, root), load_manifest(cfg.data.val_manifest, root)
    if manifest.class_names != val_manifest.class_names:
        raise RunError(
            f"{cfg.data.manifest} and {cfg.data.val_manifest} have different classes "
            f"({manifest.num_classes} vs {val_manifest.num_classes}, or a different order); build both from one class list"
        )
    return manifest, val_manifest


def _place(module: nn.Module, runtime: Runtime, compile: bool) -> nn.Module:
    """To the device (channels_last on CUDA), optionally compiled, DDP-wrapped under torchrun."""
    module = module.to(runtime.device, memory_format=runtime.memory_format())
    if compile:
        module = torch.compile(module)
    if runtime.distributed:
        device_ids = [runtime.device.index] if runtime.is_cuda else None
        module = nn.parallel.DistributedDataParallel(module, device_ids=device_ids)
    return module


def _loaders(cfg: Config, runtime: Runtime, manifest: Manifest, val_manifest: Manifest,
             preprocess: Preprocess, mode: str, **train_kwargs) -> tuple[Any, Any]:
    common = {"preprocess": preprocess, "runtime": runtime}
    train = build_loader(cfg.optim.loader, manifest=manifest, mode=mode, batch_size=cfg.optim.batch_size,
                         seed=cfg.runtime.seed, **common, **train_kwargs)
    val = build_loader(cfg.optim.loader, manifest=val_manifest, mode="eval",
                       batch_size=cfg.optim.eval_batch_size, **common)
    return train, val


def _meta(kind: str, model_name: str, preprocess: Preprocess, manifest: Manifest) -> dict[str, Any]:
    """What a checkpoint needs to be rebuilt anywhere (evaluate, stage-1 teacher)."""
    return {
        "kind": kind,
        "model": resolve_name(model_name),
        "num_classes": manifest.num_classes,
        "class_names": list(manifest.class_names),
        "preprocess": preprocess.to_dict(),
        "manifest_hash": manifest.content_hash,
    }
