"""Learning-rate schedule as a pure function of (epoch, step).

No scheduler object with hidden state: the multiplier for any step can be
recomputed from the config alone, so a resumed run sets exactly the learning
rates an uninterrupted run would have, and tests can check values directly.

The same multiplier scales every optimizer from *its own* base rate: the
student from ``optim.lr`` and the discriminator from ``distill.disc_lr``.
The original MEAL V2 code put the discriminator in the student's SGD as a
second parameter group with lr ``--d_lr`` 1e-4, then assigned the student's
rate to every group each epoch (train.py ``_set_learning_rate``), silently
replacing the 1e-4 -- its authors confirmed this was unintended
(szq0214/MEAL-V2 issue #9), but the released models were trained so.
``distill.disc_lr_mode = "as_released"`` reproduces that: the
discriminator's base rate is ``optim.lr``; the default ``"own"`` keeps
``distill.disc_lr``.
"""
from __future__ import annotations

import math

from torch.optim import Optimizer

from common.config import Config, OptimConfig

WARMUP_START = 0.1  # linear warmup starts from lr / 10


def lr_factor(optim: OptimConfig, epoch: int, step: int, steps_per_epoch: int) -> float:
    """Multiplier of the base learning rates for ``step`` (0-based) of ``epoch`` (0-based).

    * warmup (``warmup_epochs`` > 0): linear from 0.1 to 1 over the first epochs, per step;
    * ``step``: times ``lr_decay_factor`` for every milestone in ``lr_decay_epochs`` <= epoch;
    * ``cosine``: half a cosine from 1 to 0 over the epochs after warmup, per step.
    """
    progress = epoch + step / max(steps_per_epoch, 1)  # fractional epoch
    warmup = optim.warmup_epochs
    if warmup > 0 and progress < warmup:
        return WARMUP_START + (1.0 - WARMUP_START) * progress / warmup
    if optim.schedule == "step":
        return optim.lr_decay_factor ** sum(epoch >= m for m in optim.lr_decay_epochs)
    span = max(optim.epochs - warmup, 1e-12)
    return 0.5 * (1.0 + math.cos(math.pi * min((progress - warmup) / span, 1.0)))


def discriminator_base_lr(cfg: Config) -> float:
    """``distill.disc_lr`` ("own"), or the student's ``optim.lr`` ("as_released", as the released models)."""
    return cfg.optim.lr if cfg.distill.disc_lr_mode == "as_released" else cfg.distill.disc_lr


def set_learning_rates(optimizers: list[tuple[Optimizer, float]], factor: float) -> None:
    for optimizer, base_lr in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = base_lr * factor
