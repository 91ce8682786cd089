"""Losses of stage 2 and the two training objectives built from them.

Every loss here runs in float32 whatever the autocast dtype of the forward
pass: softmax/log-softmax over 1000 classes in bf16 loses the small
probabilities that carry the "dark knowledge" of the teachers.

An *objective* turns (logits, dense targets from targets.py) into a loss: KL to
the ensemble's targets + discriminator for ``pipeline distill``, cross entropy
to the one-hot labels for ``pipeline train``.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.runtime import to_device


def kl_to_targets(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """KL(target || softmax(logits)) = sum_k t_k (log t_k - log_softmax(s)_k), mean over the batch.

    MEAL V2's only "similarity" loss: no one-hot labels. ``xlogy`` makes
    0 * log 0 = 0, so targets with exact zeros are fine. Equals
    ``F.kl_div(log_softmax(s), t, reduction="batchmean")``; it differs from
    the original's soft cross entropy only by the target entropy, a constant
    that does not change gradients but makes 0 the minimum (easier to read).
    """
    log_q = F.log_softmax(logits.float(), dim=-1)
    targets = targets.float()
    return (torch.xlogy(targets, targets) - targets * log_q).sum(-1).mean()


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-sum_k t_k log_softmax(s)_k, mean over the batch (cross entropy to dense targets)."""
    return -(targets.float() * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


def discriminator_loss(discriminator: nn.Module, student_probs: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """MEAL V2's discriminator loss: BCE-with-logits on [student; target] with labels [1,0] / [0,1].

    Semantics mirror the original (``loss.py: discriminatorLoss`` and
    ``train.py``): the student rows and the target rows are stacked into one
    batch, the discriminator labels student outputs ``[1, 0]`` and ensemble
    targets ``[0, 1]``, and this one loss is *added to the student's loss and
    minimised jointly* by the student and the discriminator -- there is no
    alternating min-max and no label flipping for the student. The gradient
    reaches the student through ``student_probs`` (not detached), so the
    student is nudged towards outputs the discriminator can tell apart from
    the ensemble; the authors describe this as a regulariser that keeps the
    student from collapsing onto the ensemble while the KL term pulls it
    towards it (szq0214/MEAL-V2 issues #2 and #6). Target rows carry no
    gradient (they come from the cache).
    """
    batch = student_probs.shape[0]
    inputs = torch.cat([student_probs.float(), target_probs.float()], dim=0)
    labels = torch.zeros(2 * batch, 2, device=inputs.device)
    labels[:batch, 0] = 1.0  # student
    labels[batch:, 1] = 1.0  # ensemble target
    return F.binary_cross_entropy_with_logits(discriminator(inputs).float(), labels)


class DistillObjective:
    """``pipeline distill``: KL to the soft targets (+ the discriminator term) (+ w * CE to the hard label).

    ``loss = kl + d_loss`` is back-propagated once; the student's optimizer
    and the discriminator's own optimizer each step their parameters from it.

    ``label_weight`` w > 0 is not MEAL V2 (which uses no hard labels) but an
    option measured against it: ``loss = kl + w * ce + d_loss``, where ``ce`` is
    the cross entropy to the one-hot label. The targets then arrive as
    ``[soft | one_hot]`` (targets.WithHardLabels); the discriminator sees only the soft half.
    """

    def __init__(self, discriminator: nn.Module | None, label_weight: float = 0.0):
        self.discriminator = discriminator
        self.label_weight = label_weight
        self.parts = ("loss", "kl") + (("ce",) if label_weight > 0 else ()) + (
            ("d_loss",) if discriminator is not None else ())

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(total loss to back-propagate, detached float32 vector of ``self.parts``)."""
        terms = []
        if self.label_weight > 0:
            targets, hard = targets.chunk(2, dim=-1)
            kl = kl_to_targets(logits, targets)
            ce = soft_cross_entropy(logits, hard)
            loss = kl + self.label_weight * ce
            terms.append(ce)
        else:
            kl = loss = kl_to_targets(logits, targets)
        if self.discriminator is not None:
            d_loss = discriminator_loss(self.discriminator, F.softmax(logits.float(), dim=-1), targets)
            loss = loss + d_loss
            terms.append(d_loss)
        return loss, torch.stack([loss, kl, *terms]).detach()


class HardLabelObjective:
    """``pipeline train``: cross entropy to dense targets (targets.HardLabelTargets' smoothed one-hot labels)."""

    parts = ("loss",)

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss = soft_cross_entropy(logits, targets)
        return loss, loss.detach().reshape(1)


def cutmix(
    images: torch.Tensor, targets: torch.Tensor, prob: float, alpha: float, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """CutMix with dense targets mixed by pasted area (as FKD does with soft labels).

    With probability ``prob`` a box of area ~(1 - lam), lam ~ Beta(alpha, alpha),
    is pasted from a permutation of the batch; the targets are mixed with the
    *actual* area ratio after the box is clipped to the image. ``rng`` is
    the caller's, seeded per step (train.py's reproducibility contract).
    """
    if prob <= 0 or rng.random() >= prob:
        return images, targets
    batch, _, height, width = images.shape
    lam = rng.beta(alpha, alpha)
    cut = np.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut), int(width * cut)
    cy, cx = rng.integers(height), rng.integers(width)
    y1, y2 = np.clip([cy - cut_h // 2, cy + cut_h // 2], 0, height)
    x1, x2 = np.clip([cx - cut_w // 2, cx + cut_w // 2], 0, width)
    perm = to_device(torch.from_numpy(rng.permutation(batch)), images.device)
    images = images.clone()
    images[:, :, y1:y2, x1:x2] = images[perm, :, y1:y2, x1:x2]
    kept = 1.0 - float((y2 - y1) * (x2 - x1)) / (height * width)
    return images, kept * targets + (1.0 - kept) * targets[perm]
