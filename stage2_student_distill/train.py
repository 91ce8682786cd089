"""Stage 2's training loop, shared by `pipeline distill` and `pipeline train`.

``setup(cfg)`` builds a ``Job`` (runtime, data, models, optimizers, target
source); ``fit(job)`` is the one loop every run goes through, top to bottom.
``run_distill`` / ``run_train`` are ``fit(setup(cfg, ...))``. What differs
between runs is the objective (losses.py) and the target source setup
chooses (targets.py: the teacher cache, online teachers or the labels).
Benchmarks drive ``setup`` / ``train_one_epoch`` / ``fit`` directly.

Reproducibility contract: the loader's epoch order and crops, the CutMix
draws and the global RNG (dropout, drop-path) are seeded from (seed, epoch,
step, rank); the learning rate is a pure function of (epoch, step). So
last.pt needs no RNG state, and ``--resume`` reproduces an uninterrupted
run's metrics exactly on the same machine.
"""
from __future__ import annotations

import contextlib
import math
import sys
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
from common.distributed import broadcast_buffers, fail_together
from common.manifest import Manifest, check_image_files, load_manifest
from common.models import Preprocess, apply_preprocess_config, create_model, resolve_name
from common.runtime import Runtime, build_runtime, seed_everything
from stage1_teacher_cache.distill_advice import distill_start_lines
from stage1_teacher_cache.teacher_eval import read_teacher_eval, student_caught_up
from stage1_teacher_cache.teachers import load_teachers
from stage2_student_distill.checkpoint import (
    RunError,
    check_resume_epochs,
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
from stage2_student_distill.run_lock import RunDirLock
from stage2_student_distill.schedule import discriminator_base_lr, lr_factor, set_learning_rates
from stage2_student_distill.student import create_student
from stage2_student_distill.targets import CachedTargets, HardLabelTargets, OnlineTargets, TargetSource, WithHardLabels

# Config tables whose values decide a run's result (checked on --resume).
DISTILL_TABLES = ("runtime", "data", "optim", "distill", "preprocess")
TRAIN_TABLES = ("runtime", "data", "crops", "optim", "train", "preprocess")


def result_tables(config: dict[str, Any]) -> tuple[str, ...]:
    """The tables of a resolved config (nested, as a run's config.json holds it) that decide the run's
    result: `pipeline distill` wrote it if ``distill.out`` is set, else `pipeline train`. Fresh crops
    come from [crops]; cached and replayed ones from the cache. (Online runs' teachers are compared
    on resume by their identity, not by [teacher_cache].)"""
    d = config.get("distill") or {}
    if not d.get("out"):
        return TRAIN_TABLES
    return DISTILL_TABLES + (() if d.get("cache") or d.get("replay_cache") else ("crops",))


@dataclass
class Job:
    """Everything ``fit`` needs; built by ``setup``."""

    cfg: Config
    runtime: Runtime
    run_dir: Path
    resume: bool
    student: nn.Module  # on device; compiled and DDP-wrapped as configured
    discriminator: nn.Module | None  # on device, DDP-wrapped under torchrun
    objective: DistillObjective | HardLabelObjective
    targets: TargetSource  # batch -> dense float32 targets: cached, online (either WithHardLabels) or hard labels
    train_loader: Any
    val_loader: Any
    meta: dict[str, Any]  # checkpoint metadata (model, classes, preprocess, teachers, ...)
    # "student" (+ "discriminator"), as saved in last.pt; the schedule scales each one's lr as built (defaults["lr"])
    optimizers: dict[str, torch.optim.Optimizer]
    scaler: torch.amp.GradScaler
    cutmix_prob: float = 0.0
    cutmix_alpha: float = 1.0
    # the cache's teacher_eval when it scored the teachers on this run's validation images, else None
    teacher_eval: dict[str, Any] | None = None
    # what the run holds until fit ends: the run directory's lock (run_lock.py)
    held: contextlib.ExitStack | None = None


def fit(job: Job) -> dict[str, Any]:
    """Train ``job.student`` for the configured epochs; checkpoint every epoch and validate
    every ``optim.eval_every`` epochs and after the last (best.pt only moves on validated epochs).
    The run directory's lock is released at the end, also when the run fails."""
    with job.held or contextlib.nullcontext():
        return _fit(job)


def _fit(job: Job) -> dict[str, Any]:
    cfg, rt = job.cfg, job.runtime
    student, optimizers, scaler = unwrap(job.student), job.optimizers, job.scaler

    start_epoch, best_top1 = 0, -math.inf
    if job.resume:
        state = load_training_state(
            job.run_dir / "last.pt", model=student, discriminator=job.discriminator, optimizers=optimizers, scaler=scaler
        )
        if state["meta"].get("manifest_hash") != job.meta["manifest_hash"]:
            raise RunError(f"cannot resume {job.run_dir}: it was trained on a different manifest (content hash differs)")
        check_same_teachers(job.run_dir, state["meta"].get("online"), job.meta.get("online"))
        start_epoch, best_top1 = state["epoch"], state["best_top1"]
        check_resume_epochs(job.run_dir, start_epoch, cfg.optim.epochs)
        if rt.is_main:
            print(f"resuming {job.run_dir} after epoch {start_epoch} (best top-1 {best_top1:.2f}%)", flush=True)
    with fail_together(rt):  # rank-0-only work before a collective: a failure stops every rank
        metrics = open_run_log(job.run_dir, start_epoch, cfg.optim.log, write=rt.is_main)  # metrics.jsonl (+ TensorBoard)

    record: dict[str, Any] | None = None
    for epoch in range(start_epoch, cfg.optim.epochs):
        epoch_start = time.perf_counter()
        train = train_one_epoch(job, epoch)
        broadcast_buffers(rt, job.student, job.discriminator)  # the model rank 0 saves is every rank's
        with fail_together(rt):
            check_weights_finite(job, epoch)  # before validating and writing anything of this epoch
        validate = (epoch + 1) % cfg.optim.eval_every == 0 or epoch + 1 == cfg.optim.epochs
        val = evaluate(student, job.val_loader, rt) if validate else None
        record = {
            "epoch": epoch + 1,
            **{f"train_{name}": value for name, value in train["losses"].items()},
            # epochs without validation have no val_* keys (consumers filter on "val_top1")
            **({"val_top1": val["top1"], "val_top5": val["top5"], "val_loss": val["loss"]} if val else {}),
            "lr": cfg.optim.lr * train["lr_factor"],
            **({"disc_lr": discriminator_base_lr(cfg) * train["lr_factor"]} if job.discriminator is not None else {}),
            "img_per_s": train["img_per_s"],
            **train["times"],  # the target source's own time and the student's, where the source has one
            "time_s": time.perf_counter() - epoch_start,
        }
        with fail_together(rt):  # rank 0 writes; if that fails (disk full), every rank stops with its message
            if rt.is_main:
                meta = {**job.meta, "epoch": epoch + 1,
                        **({"val_top1": val["top1"], "val_top5": val["top5"]} if val else {})}
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
    note = student_caught_up(best_top1, job.teacher_eval) if record is not None else None
    if note and rt.is_main:
        print(f"note: {note}", file=sys.stderr, flush=True)
    return {
        "run_dir": str(job.run_dir),
        "epochs": cfg.optim.epochs,
        "best_top1": best_top1,
        "last": record,
        "is_main": rt.is_main,
        "teacher_note": note,
    }


def check_same_teachers(run_dir: Path, saved: dict | None, current: dict | None) -> None:
    """An online run resumes only with the teachers (weights hashes), ensemble rule and crop source
    it was started with; where the weights files or the replayed cache live may change."""
    def essence(online):
        return None if online is None else {k: online[k] for k in ("teachers", "ensemble", "crops")}

    if essence(saved) != essence(current):
        def describe(online):
            if online is None:
                return "cached targets"
            names = ", ".join(f"{t['name']} ({t['weights']} {str(t['weights_sha256'] or t['init_seed'])[:12]})"
                              for t in online["teachers"])
            return f"online teachers {names}, temperature {online['ensemble']['temperature']}, {online['crops']} crops"

        raise RunError(f"cannot resume {run_dir}: it was trained with {describe(saved)}, this run has "
                       f"{describe(current)}; resume with the run's teachers or start a new run with another --out")


def train_one_epoch(job: Job, epoch: int) -> dict[str, Any]:
    """One pass over ``job.train_loader``; loss sums stay on the device except on log steps."""
    cfg, rt, objective, scaler = job.cfg, job.runtime, job.objective, job.scaler
    optimizers = list(job.optimizers.values())
    base_lrs = [(o, o.defaults["lr"]) for o in optimizers]  # each one's lr as built; the schedule scales it
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
    clock = Clock(job.targets)
    watch = NonFiniteWatch(rt.device, loss_scaling=scaler.is_enabled())
    for step, batch in enumerate(job.train_loader.epoch(epoch)):
        clock.fetched()
        set_learning_rates(base_lrs, lr_factor(cfg.optim, epoch, step, steps))
        rng = np.random.default_rng([cfg.runtime.seed, epoch, step, rt.rank])
        images, targets = cutmix(batch.images, job.targets(batch), job.cutmix_prob, job.cutmix_alpha, rng)

        with rt.autocast():
            logits = job.student(images)
        loss, parts = objective(logits, targets)  # float32, outside autocast
        scaler.scale(loss).backward()
        for optimizer in optimizers:
            scaler.step(optimizer)
        scaler.update()
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)

        n = images.shape[0]
        counted = watch.update(step, parts, images, targets) * n  # 0 for a step the loss scaler skipped
        sums[:-1] += torch.where(counted > 0, parts * n, 0.0)
        sums[-1] += counted
        bar.update(n)
        if (step + 1) % cfg.optim.log_every == 0:
            with fail_together(rt):
                watch.check(job, epoch, steps)
            log_step(job, bar, sums, epoch, step, steps, optimizers[0].param_groups[0]["lr"], clock)
        clock.stepped()
    bar.close()
    with fail_together(rt):
        watch.check(job, epoch, steps)  # before the epoch's losses count or anything is written
    elapsed = time.perf_counter() - clock.start
    if rt.distributed:
        torch.distributed.all_reduce(sums)
    totals = sums.tolist()  # the epoch's one sync
    images_seen = max(totals[-1], 1.0)
    return {
        "losses": {name: value / images_seen for name, value in zip(objective.parts, totals[:-1])},
        "img_per_s": totals[-1] / max(elapsed, 1e-9),
        "lr_factor": lr_factor(cfg.optim, epoch, 0, steps),
        "times": clock.split(),
    }


class Clock:
    """An epoch's wall time split into waiting for the loader, the target source's own times
    (``TargetSource.times``: online, ``teacher_s``) and the student (``student_s``, the rest)."""

    def __init__(self, targets: TargetSource):
        self.start = self.last = time.perf_counter()
        self.waited = 0.0
        self.targets = targets
        self.at_start = targets.times()

    def fetched(self) -> None:
        self.waited += time.perf_counter() - self.last

    def stepped(self) -> None:
        self.last = time.perf_counter()

    def split(self) -> dict[str, float]:
        """The source's times this epoch so far, and ``student_s`` beside them; {} for a source with none."""
        spent = {key: total - self.at_start[key] for key, total in self.targets.times().items()}
        if not spent:
            return {}
        busy = time.perf_counter() - self.start - self.waited
        return {**spent, "student_s": max(busy - sum(spent.values()), 0.0)}


class NonFiniteWatch:
    """Which step of an epoch first had a non-finite loss, and why, recorded on the device.

    Asking ``loss.isfinite()`` on the host every step would make the host wait for
    the GPU every step; instead each step folds its verdict into a few device
    tensors (no sync), and :meth:`check` reads them in one sync on log steps and
    at the epoch's end, before anything of the epoch is counted or written.

    Under fp16 loss scaling (``GradScaler``), a step whose loss is not finite has
    non-finite gradients, so the scaler skips it (no update) and lowers its
    scale: the weights are intact, and that is not a failure. It is left out of
    the loss sums (``update`` returns 0). It is one when the batch itself is not
    finite (no scale fixes data), or after ``MAX_SKIPPED_IN_A_ROW`` skips in a
    row (the forward pass overflows fp16, which a gradient scale cannot cure).
    """

    MAX_SKIPPED_IN_A_ROW = 32  # the scale has been halved 32 times: 2**16 -> 2**-16
    TARGETS, INPUTS = 1, 2  # bits of ``cause``

    def __init__(self, device: torch.device, loss_scaling: bool):
        self.loss_scaling = loss_scaling
        zero = torch.zeros((), dtype=torch.float64, device=device)
        self.first_step = zero - 1  # the first failed step (0-based), -1 while none
        self.cause = zero.clone()  # TARGETS | INPUTS of that step's batch
        self.loss = zero.clone()  # that step's loss (nan, inf or -inf)
        self.skipped_in_a_row = zero.clone()

    def update(self, step: int, parts: torch.Tensor, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Fold in one step (``parts``: its detached loss parts); 1.0 if its losses count, else 0.0 (device)."""
        finite = torch.isfinite(parts).all()
        cause = _not_finite(targets) * self.TARGETS + _not_finite(images) * self.INPUTS
        if self.loss_scaling:
            self.skipped_in_a_row = torch.where(finite, 0.0, self.skipped_in_a_row + 1)
            failed = ~finite & ((cause > 0) | (self.skipped_in_a_row >= self.MAX_SKIPPED_IN_A_ROW))
        else:
            failed = ~finite
        new = failed & (self.first_step < 0)
        self.first_step = torch.where(new, float(step), self.first_step)
        self.cause = torch.where(new, cause, self.cause)
        self.loss = torch.where(new, parts[0].double(), self.loss)
        return finite.double()

    def check(self, job: Job, epoch: int, steps: int) -> None:
        """Raise (one sync) if a step so far failed, naming the epoch, the step and the likely cause."""
        first_step, cause, loss = torch.stack([self.first_step, self.cause, self.loss]).tolist()
        if first_step < 0:
            return
        raise RunError(
            f"training stopped at epoch {epoch + 1} step {int(first_step) + 1} of {steps}: the loss is {loss}; "
            f"{self._likely_cause(job, int(cause))}; nothing was written for epoch {epoch + 1}"
            + (f" ({job.run_dir} keeps epoch {epoch})" if epoch else "")  # the epochs before this one
        )

    def _likely_cause(self, job: Job, cause: int) -> str:
        if cause & self.TARGETS:
            return "that batch's targets are not finite" + job.targets.non_finite_hint
        if cause & self.INPUTS:
            return "that batch's input images are not finite after normalisation (check preprocess.mean/std)"
        lr = f"lower the learning rate (--lr, now {job.cfg.optim.lr:g})"
        if self.loss_scaling:
            return (f"{self.MAX_SKIPPED_IN_A_ROW} steps in a row overflowed under fp16 loss scaling (the scaler "
                    f"skipped them; the forward pass exceeds fp16's range): train with --precision bf16 or fp32, or {lr}")
        return f"the batch's inputs and targets are finite, so the training diverged: {lr}" + (
            ", or warm up (--warmup-epochs)" if not job.cfg.optim.warmup_epochs else "")


def _not_finite(batch: torch.Tensor) -> torch.Tensor:
    """1.0 if ``batch`` holds a NaN or an infinity, else 0.0, on its device.

    One float32 sum instead of ``isfinite().all()`` (a bool copy of the batch: about 30x slower
    on the CPU for a 64 x 224 x 224 batch, measured): a NaN or an inf anywhere makes the
    sum non-finite, and sums of normalised pixels or probabilities cannot overflow.
    """
    return (~torch.isfinite(batch.sum(dtype=torch.float32))).double()


def check_weights_finite(job: Job, epoch: int) -> None:
    """Refuse to validate or save weights that are not finite (one sync per epoch).

    A finite loss whose update overflowed leaves such weights after the epoch's
    last step, and no later loss of the epoch shows it.
    """
    modules = [m for m in (job.student, job.discriminator) if m is not None]
    tensors = [t for m in modules for t in unwrap(m).state_dict().values() if t.is_floating_point()]
    if bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
        return
    raise RunError(
        f"training stopped after epoch {epoch + 1}: the weights are not finite (the last step's update "
        f"overflowed) although every loss of the epoch was; lower the learning rate (--lr, now {job.cfg.optim.lr:g}); "
        f"nothing was written for epoch {epoch + 1}" + (f" ({job.run_dir} keeps epoch {epoch})" if epoch else "")
    )


def log_step(job: Job, bar, sums: torch.Tensor, epoch: int, step: int, steps: int, lr: float, clock: Clock) -> None:
    """Running means of this rank's losses: on the bar, or as a line when progress is off."""
    values = sums.tolist()
    means = {name: v / max(values[-1], 1.0) for name, v in zip(job.objective.parts, values[:-1])}
    text = " ".join(f"{name} {value:.4f}" for name, value in means.items()) + f" lr {lr:.3g}"
    # where the step time goes, for a target source with time of its own (online: "teacher 1.2s student 3.4s")
    text += "".join(f" {key.removesuffix('_s')} {seconds:.1f}s" for key, seconds in clock.split().items())
    if job.runtime.progress:
        bar.set_postfix_str(text, refresh=False)
    elif job.runtime.is_main:
        rate = values[-1] / max(time.perf_counter() - clock.start, 1e-9)
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
        + (f" (teachers {record['teacher_s']:.1f} s, student {record['student_s']:.1f} s)" if "teacher_s" in record else "")
    )


def run_distill(cfg: Config) -> dict[str, Any]:
    """`pipeline distill`: train ``distill.student`` from a teacher cache, or online from live teachers."""
    return fit(setup(cfg, "distill"))


def run_train(cfg: Config) -> dict[str, Any]:
    """`pipeline train`: hard-label training (baselines, and teachers for custom datasets)."""
    return fit(setup(cfg, "train"))


def setup(cfg: Config, command: str = "distill") -> Job:
    """The ``Job`` of `pipeline distill` (``command="distill"``) or `pipeline train` (``"train"``)."""
    build = {"distill": _setup_distill, "train": _setup_train}[command]
    with contextlib.ExitStack() as held:  # a failing setup releases what it took here; else fit does
        job = build(cfg, held)
        job.held = held.pop_all()
    return job


def _take_run_dir(held: contextlib.ExitStack, out: str, cfg: Config, resume: bool, tables: tuple[str, ...],
                  runtime: Runtime) -> Path:
    """The run directory, locked by the rank that writes it (held until ``fit`` ends), checked, its config written.

    Checked before the lock too, so that a refused request (a URL, --resume of nothing) creates nothing;
    the check that counts is the one under the lock (another run may have written last.pt meanwhile).
    """
    with fail_together(runtime):
        if runtime.is_main:
            prepare_run_dir(out, cfg.to_dict(), resume, tables, write=False)
            held.enter_context(RunDirLock(out))
        return prepare_run_dir(out, cfg.to_dict(), resume, tables, write=runtime.is_main)


def _setup_distill(cfg: Config, held: contextlib.ExitStack) -> Job:
    d = cfg.distill
    required = {"data.manifest": "--manifest", "data.val_manifest": "--val-manifest", "distill.out": "--out"}
    if d.replay_cache and not d.online:
        raise RunError("--replay-cache CACHE scores the cache's crops with live teachers: it needs --online "
                       "(without it, pass the cache as --cache)")
    if d.online and d.cache:
        raise RunError("--online runs the teachers on fresh crops, --cache replays cached targets: give one "
                       "(config keys distill.online, distill.cache); --online --replay-cache CACHE uses a cache's crops")
    if not d.online:
        required["distill.cache"] = "--cache (or --online to run the teachers in the loop)"
    _require(cfg, required)
    runtime = build_runtime(cfg.runtime)
    manifest, val_manifest = _load_manifests(cfg, with_digests=d.check_images)
    if d.label_weight > 0:
        _require_labels(manifest, "distill.label_weight > 0 (--label-weight) adds cross entropy to the label")
    if d.check_images:
        with fail_together(runtime):  # each rank digests its share of the files; a mismatch stops every rank
            for checked in (manifest, val_manifest):
                check_image_files(checked, progress=runtime.progress, share=(runtime.rank, runtime.world_size))
    cache_path = d.cache or d.replay_cache
    cache = CacheReader(cache_path, manifest_hash=manifest.content_hash, manifest_images=manifest.num_images,
                        num_classes=manifest.num_classes) if cache_path else None
    run_dir = _take_run_dir(held, d.out, cfg, d.resume, result_tables(cfg.to_dict()), runtime)
    # The cache's figures against the measured rule (docs/teachers.md), read on every rank: a forged figure then
    # stops every rank with the same one-line error instead of rank 0 alone. Printed once.
    advice = distill_start_lines(cache.attrs, d.hard_label_top1, cfg.optim.epochs, d.crops_per_image,
                                 cache.num_crops, cache.path) if cache is not None else []
    if runtime.is_main:
        for line in advice:
            print(line, file=sys.stderr, flush=True)

    if d.online:
        # Before the student is seeded, so the student starts as in a cached run.
        teachers = load_teachers(cfg.teacher_cache, manifest.num_classes, runtime, seed=cfg.runtime.seed)
        targets: TargetSource = OnlineTargets(teachers, runtime, cfg.teacher_cache.temperature)
        views = targets.views
        meta_extra = {"online": {**targets.identity(), "crops": "replayed" if cache else "fresh",
                                 "replay_cache": d.replay_cache or None}}
    else:
        targets, views = CachedTargets(d.cache), None
        meta_extra = {"cache": {"path": d.cache, "teachers": cache.attrs.get("teachers")}}
    if d.label_weight > 0:
        targets = WithHardLabels(targets, manifest.num_classes)

    seed_everything(cfg.runtime.seed)  # same initial student (and discriminator) on every run and rank
    student, preprocess = create_student(cfg, manifest.num_classes)
    student = _place(student, runtime, compile=runtime.compile)
    discriminator = _place(Discriminator(manifest.num_classes), runtime, compile=False) if d.discriminator else None
    # Cached and replayed runs take the cache's boxes (mode "distill"); fresh online runs draw
    # crop index epoch * m + j from [crops] (mode "train"), as hard-label training does.
    train_loader, val_loader = _loaders(cfg, runtime, manifest, val_manifest, preprocess,
                                        mode="distill" if cache is not None else "train",
                                        crops_per_image=d.crops_per_image, views=views, cache=cache)
    meta = {**_meta("distill", d.student, preprocess, manifest), **meta_extra}
    return Job(
        cfg=cfg, runtime=runtime, run_dir=run_dir, resume=d.resume, student=student, discriminator=discriminator,
        objective=DistillObjective(discriminator, d.label_weight), targets=targets, train_loader=train_loader, val_loader=val_loader,
        meta=meta, optimizers=_optimizers(cfg, student, discriminator), scaler=runtime.grad_scaler(),
        cutmix_prob=d.cutmix_prob, cutmix_alpha=d.cutmix_alpha, teacher_eval=_teacher_eval_on(cache, val_manifest),
    )


def _require_labels(manifest: Manifest, why: str) -> None:
    unlabeled = int((manifest.labels < 0).sum())
    if unlabeled:
        raise RunError(f"{manifest.path}: {unlabeled} images have no label (-1); {why}, so it needs every label")


def _teacher_eval_on(cache: CacheReader | None, val_manifest: Manifest) -> dict[str, Any] | None:
    """The cache's scores of its teachers, when they were measured on ``val_manifest`` (same content hash)."""
    evaluation = read_teacher_eval(cache.attrs.get("teacher_eval"), f"{cache.path}: zarr.json: teacher_eval") \
        if cache is not None else None
    if evaluation and evaluation.get("manifest", {}).get("hash") == val_manifest.content_hash:
        return evaluation
    return None


def _setup_train(cfg: Config, held: contextlib.ExitStack) -> Job:
    t = cfg.train
    _require(cfg, {"data.manifest": "--manifest", "data.val_manifest": "--val-manifest", "train.out": "--out"})
    runtime = build_runtime(cfg.runtime)
    manifest, val_manifest = _load_manifests(cfg)
    _require_labels(manifest, "`pipeline train` trains on the labels")
    run_dir = _take_run_dir(held, t.out, cfg, t.resume, TRAIN_TABLES, runtime)

    seed_everything(cfg.runtime.seed)
    model, preprocess = create_model(
        t.model, manifest.num_classes, pretrained=t.pretrained,
        weights=t.weights or None, input_size=cfg.optim.img_size or None,
    )
    preprocess = apply_preprocess_config(preprocess, cfg.preprocess)
    model = _place(model, runtime, compile=runtime.compile)
    train_loader, val_loader = _loaders(cfg, runtime, manifest, val_manifest, preprocess, mode="train")
    return Job(
        cfg=cfg, runtime=runtime, run_dir=run_dir, resume=t.resume, student=model, discriminator=None,
        objective=HardLabelObjective(), targets=HardLabelTargets(manifest.num_classes, t.label_smoothing),
        train_loader=train_loader, val_loader=val_loader,
        meta=_meta("train", t.model, preprocess, manifest), optimizers=_optimizers(cfg, model, None),
        scaler=runtime.grad_scaler(),
    )


def _optimizers(cfg: Config, student: nn.Module, discriminator: nn.Module | None) -> dict[str, torch.optim.Optimizer]:
    """SGD for the student and (MEAL V2) for the discriminator, by name."""
    optimizers = {
        "student": torch.optim.SGD(
            unwrap(student).parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
            weight_decay=cfg.optim.weight_decay,
        )
    }
    if discriminator is not None:
        # Its own optimizer; its base lr is distill.disc_lr, or the student's "as released" (schedule.py).
        optimizers["discriminator"] = torch.optim.SGD(
            unwrap(discriminator).parameters(), lr=discriminator_base_lr(cfg), momentum=cfg.optim.momentum
        )
    return optimizers


def _require(cfg: Config, keys: dict[str, str]) -> None:
    for key, flag in keys.items():
        table, _, name = key.partition(".")
        if not getattr(getattr(cfg, table), name):
            raise RunError(f"missing {flag} (config key {key})")


def _load_manifests(cfg: Config, with_digests: bool = False) -> tuple[Manifest, Manifest]:
    root = cfg.data.data_root or None
    manifest, val_manifest = (load_manifest(cfg.data.manifest, root, with_digests),
                              load_manifest(cfg.data.val_manifest, root, with_digests))
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
                         seed=cfg.runtime.seed, crops=cfg.crops, **common, **train_kwargs)
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
