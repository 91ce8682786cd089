"""Run directories and checkpoints.

A run directory holds::

    config.json    the resolved config (rewritten on resume)
    metrics.jsonl  one line per epoch (metrics.py)
    last.pt        everything needed to continue: student, discriminator, both
                   optimizers, grad scaler, completed epochs, best top-1
    best.pt        the student alone with its metadata (model name, classes,
                   preprocessing) -- what `pipeline evaluate` and stage 1's
                   ``--teacher-weights NAME=RUN/best.pt`` read

Both checkpoints have the ``{"model": state_dict, "meta": {...}}`` shape that
``common.models.read_weights`` understands, so last.pt works as weights too.
They are written atomically (a crash mid-write leaves the previous file) and
hold only tensors and plain Python values, so they load with
``weights_only=True``. No RNG state is saved (train.py's reproducibility contract).
"""
from __future__ import annotations

import contextlib
import errno
import json
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from common.atomic import atomic_torch_save, atomic_write_json
from common.config import Config
from common.errors import PipelineError
from common.models import load_torch_file
from common.locations import require_local


class RunError(PipelineError):
    """A run directory, checkpoint or input does not fit the requested run."""


# Keys that may change between a run and its resumption: they do not change
# the math (device placement, memory layout, threads, logging, validation
# cadence) or are the reason to resume (the resume flag itself, a relocated
# image root). Every other key of the checked tables is refused: a resumed run
# with another student, cache, seed, batch size, lr, schedule, loader... would
# be neither the old run nor a new one (docs/reliability.md lists them).
RESUME_MAY_CHANGE = frozenset(
    {
        "runtime.device",
        "runtime.channels_last",
        "runtime.compile",
        "runtime.num_workers",
        "runtime.torch_threads",
        "runtime.progress",
        "data.data_root",
        "optim.eval_batch_size",
        "optim.eval_every",
        "optim.log_every",
        "optim.log",
        "distill.resume",
        "distill.check_images",  # a check before training, not part of it
        "distill.hard_label_top1",  # advice printed at start, not part of training
        "train.resume",
        # locations: a run directory or a dataset may move; what is inside is
        # checked by content (the manifest hash recorded in last.pt)
        "distill.out",
        "train.out",
        "data.manifest",
        "data.val_manifest",
    }
)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP (``.module``) and torch.compile (``._orig_mod``)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def flatten_config(cfg: dict[str, Any], tables: tuple[str, ...]) -> dict[str, Any]:
    """``{"optim": {"lr": 0.1}}`` -> ``{"optim.lr": 0.1}``, for the config tables ``tables`` (absent ones skipped)."""
    return {f"{t}.{k}": v for t in tables for k, v in cfg.get(t, {}).items()}


def config_differences(saved: dict[str, Any], current: dict[str, Any], tables: tuple[str, ...]) -> list[str]:
    """``"table.key: run has X, now Y"`` for every relevant key that changed.

    A key the run's config.json predates counts as its default (what that run used).
    """
    old = {**flatten_config(Config().to_dict(), tables), **flatten_config(saved, tables)}
    new = flatten_config(current, tables)
    return [
        _difference(key, old.get(key), new.get(key), old)
        for key in sorted(old.keys() | new.keys())
        if key not in RESUME_MAY_CHANGE and old.get(key) != new.get(key) and not _extends(key, old)
    ]


def _extends(key: str, old: dict[str, Any]) -> bool:
    """More (or fewer) epochs under the step schedule: its milestones are absolute epochs, so every
    completed step had the lr the longer run would have given it; the lr stays at its last value.
    (Fewer epochs than already completed is refused by :func:`check_resume_epochs`.)"""
    return key == "optim.epochs" and old.get("optim.schedule") == "step"


def _difference(key: str, was: Any, now: Any, old: dict[str, Any]) -> str:
    if key == "optim.epochs":  # the cosine schedule spans optim.epochs: a new span makes the lr jump
        return (f"optim.epochs: run has {was!r}, now {now!r}; the {old.get('optim.schedule')} schedule spans "
                f"optim.epochs, so the learning rate would jump on resume (resume with --set optim.epochs={was!r}, "
                "or train longer in a new run that starts from this run's last.pt as its weights)")
    return f"{key}: run has {was!r}, now {now!r}"


def check_resume_epochs(run_dir: str | Path, completed: int, epochs: int) -> None:
    """A resumed run cannot end before the epochs it has already completed."""
    if epochs < completed:
        raise RunError(
            f"cannot resume {run_dir}: it has completed {completed} epochs but optim.epochs = {epochs}; "
            f"a run cannot be shortened (resume with optim.epochs >= {completed}, or use its best.pt / last.pt)"
        )


def prepare_run_dir(out: str | Path, cfg: dict[str, Any], resume: bool, tables: tuple[str, ...], write: bool) -> Path:
    """Check ``out`` against the request, then (if ``write``) record the resolved config.

    A fresh run refuses a directory that already holds one (no silent
    overwrite of someone's checkpoints); a resumed run refuses a config that
    differs in any key that changes the result, naming the keys.
    """
    run_dir = require_local(out, "a run directory (checkpoints are renamed into place)")
    last, config_path = run_dir / "last.pt", run_dir / "config.json"
    if resume:
        if not last.is_file():
            raise RunError(f"cannot resume: {last} does not exist; start the run without --resume")
        if not config_path.is_file():
            raise RunError(f"cannot resume: {config_path} is missing; was {run_dir} written by `pipeline`?")
        diffs = config_differences(json.loads(config_path.read_text()), cfg, tables)
        if diffs:
            raise RunError(
                f"cannot resume {run_dir}: it was made with a different config:\n  - "
                + "\n  - ".join(diffs)
                + "\nRerun with the run's values, or start a new run with another --out."
            )
    elif last.exists():
        raise RunError(f"{run_dir} already holds a run (last.pt); pass --resume to continue it, or choose another --out")
    if write:
        with writing(config_path):
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(config_path, cfg)
    return run_dir


# errno -> (what it means, what to do); anything else: "Fix the cause".
_WRITE_REMEDIES = {
    errno.ENOSPC: ("disk full", "Free some space"),
    errno.EDQUOT: ("quota exceeded", "Free some space"),
    errno.EROFS: ("the filesystem is mounted read-only", "Remount it read-write or choose another --out"),
    errno.EACCES: ("no write permission", "Give this user write access or choose another --out"),
    errno.EPERM: ("no write permission", "Give this user write access or choose another --out"),
}


def write_failure(path: str | Path, e: OSError, epoch: int | None) -> str:
    """One line for a failed write of ``path`` while saving ``epoch`` (None: before training):
    the file, the cause, what is kept and how to go on (as stage 1 words its shards' failures)."""
    meaning, remedy = _WRITE_REMEDIES.get(e.errno, (None, "Fix the cause"))
    cause = f"{e.strerror or e}" + (f" ({meaning})" if meaning else "")
    if epoch is None:
        return f"{path}: writing it failed: {cause}. {remedy}, then rerun the same command."
    if epoch == 1:
        return (f"{path}: writing it for epoch 1 failed: {cause}; epoch 1 is not saved (no earlier epoch to keep). "
                f"{remedy}, then rerun the same command.")
    return (f"{path}: writing it for epoch {epoch} failed: {cause}; epoch {epoch} is not saved and the run's files "
            f"of epoch {epoch - 1} are kept. {remedy}, then rerun with --resume to continue after epoch {epoch - 1}.")


@contextlib.contextmanager
def writing(path: str | Path, epoch: int | None = None) -> Iterator[None]:
    """Turn an OSError while writing ``path`` (disk full, read-only, permission) into a :class:`RunError`
    naming the file. Earlier files stay intact: checkpoints are written atomically, metrics.jsonl's
    half-written line is cut off (``MetricsLog.append``)."""
    try:
        yield
    except OSError as e:
        raise RunError(write_failure(path, e, epoch)) from e


def save_model(path: str | Path, model: nn.Module, meta: dict[str, Any]) -> None:
    """Model-only checkpoint: ``{"model": state_dict, "meta": meta}``."""
    with writing(path, meta.get("epoch")):
        atomic_torch_save(path, {"model": unwrap(model).state_dict(), "meta": meta})


def save_training_state(
    path: str | Path,
    *,
    model: nn.Module,
    meta: dict[str, Any],
    discriminator: nn.Module | None,
    optimizers: dict[str, torch.optim.Optimizer],
    scaler: torch.amp.GradScaler,
    epoch: int,
    best_top1: float,
) -> None:
    """last.pt: ``epoch`` is the number of completed epochs (where a resume starts)."""
    with writing(path, epoch):
        atomic_torch_save(
            path,
            {
                "model": unwrap(model).state_dict(),
                "meta": meta,
                "discriminator": unwrap(discriminator).state_dict() if discriminator is not None else None,
                "optimizers": {name: opt.state_dict() for name, opt in optimizers.items()},
                "scaler": scaler.state_dict(),
                "epoch": epoch,
                "best_top1": best_top1,
            },
        )


def load_training_state(
    path: str | Path,
    *,
    model: nn.Module,
    discriminator: nn.Module | None,
    optimizers: dict[str, torch.optim.Optimizer],
    scaler: torch.amp.GradScaler,
) -> dict[str, Any]:
    """Restore last.pt into the given objects; returns its ``epoch``, ``best_top1`` and ``meta``."""
    state = load_torch_file(path)  # a WeightsError naming the cause if unsafe or unreadable
    if not isinstance(state, dict) or "optimizers" not in state or "epoch" not in state:
        raise RunError(f"{path}: not a training checkpoint written by `pipeline distill/train`")
    if (state["discriminator"] is None) != (discriminator is None):
        raise RunError(f"{path}: the run was made with discriminator={state['discriminator'] is not None}")
    if set(state["optimizers"]) != set(optimizers):
        raise RunError(f"{path}: holds optimizers {sorted(state['optimizers'])}, this run has {sorted(optimizers)}")
    unwrap(model).load_state_dict(state["model"])
    if discriminator is not None:
        unwrap(discriminator).load_state_dict(state["discriminator"])
    for name, opt in optimizers.items():
        opt.load_state_dict(state["optimizers"][name])
    if state["scaler"]:  # empty when loss scaling is off (anything but fp16)
        scaler.load_state_dict(state["scaler"])
    return {"epoch": int(state["epoch"]), "best_top1": float(state["best_top1"]), "meta": state["meta"]}
