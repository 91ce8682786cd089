"""Where a training step's dense targets come from: one protocol, three sources.

The training loop calls the same two methods of whichever source setup chose
(:class:`TargetSource`): ``source(batch)`` -> dense [B, K] float32 targets,
and ``source.times()`` -> the seconds the source itself spent, by metrics.jsonl
key. It never asks which source it has.

* :class:`CachedTargets` (``pipeline distill --cache``): the cache's top-k,
  restored by the loader (the product's main path; no teacher is loaded);
* :class:`OnlineTargets` (``--online``): online MEAL V2. The ensemble runs on the teachers' views of
  the batch's crops (rendered by the loader from the student's decode; fresh crops, or a cache's with
  ``--replay-cache``) under inference_mode (bf16 + channels_last on CUDA, as stage 1), and the *full*
  mean softmax (``stage1_teacher_cache.ensemble.teacher_probs``) is the target.
* :class:`HardLabelTargets` (``pipeline train``): the (smoothed) one-hot label.

:class:`WithHardLabels` appends the one-hot label to a distill source for ``distill.label_weight``.
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from common.runtime import Runtime
from stage1_teacher_cache.ensemble import RULE, teacher_probs
from stage1_teacher_cache.teachers import Teacher


class TargetSource(ABC):
    """What the training loop asks of every target source."""

    # Why this source's targets can hold a NaN or an inf, and the remedy: the tail of the loop's one-line error
    non_finite_hint = ""

    @abstractmethod
    def __call__(self, batch) -> torch.Tensor:
        """Dense float32 targets of ``batch``, one row per image: [B, K] ([B, 2K] for WithHardLabels)."""

    def times(self) -> dict[str, float]:
        """Seconds spent producing targets so far, by metrics.jsonl key (train.Clock splits them from the
        student's); empty where that time is the loader's (cached targets) or negligible (one-hot labels)."""
        return {}


class CachedTargets(TargetSource):
    """The cache's soft targets, restored to dense rows by the loader (mode "distill")."""

    def __init__(self, cache: str):
        self.non_finite_hint = (f" (the teacher cache {cache} holds non-finite soft labels: rebuild it; "
                                "`pipeline cache verify` names damaged shards)")

    def __call__(self, batch) -> torch.Tensor:
        return batch.targets


class HardLabelTargets(TargetSource):
    """``pipeline train``: each image's one-hot label, smoothed as ``F.cross_entropy(label_smoothing=)`` does."""

    def __init__(self, num_classes: int, label_smoothing: float = 0.0):
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing

    def __call__(self, batch) -> torch.Tensor:
        one_hot = F.one_hot(batch.labels.long(), self.num_classes).float()
        return one_hot * (1.0 - self.label_smoothing) + self.label_smoothing / self.num_classes


class WithHardLabels(TargetSource):
    """A target source with each row's one-hot label appended: [B, 2K] = [soft | one_hot].

    For ``distill.label_weight`` > 0 (losses.DistillObjective splits the two
    halves); carried as one tensor so CutMix mixes label and soft target by
    the same area. Every image must have a label (setup checks). Its timing and
    non-finite hint are the soft source's (one-hot labels are cheap and finite).
    """

    def __init__(self, source: TargetSource, num_classes: int):
        self.source = source
        self.labels = HardLabelTargets(num_classes)
        self.non_finite_hint = source.non_finite_hint

    def __call__(self, batch) -> torch.Tensor:
        return torch.cat([self.source(batch), self.labels(batch)], dim=-1)

    def times(self) -> dict[str, float]:
        return self.source.times()


class OnlineTargets(TargetSource):
    """The teachers' mean softmax on the batch's crops, computed in the loop; ``views`` (each teacher's
    :class:`~common.models.Preprocess`) tells the loader what to render beside the student's view."""

    non_finite_hint = " (the online teachers output non-finite probabilities: check their weights, --teacher-weights)"

    def __init__(self, teachers: Sequence[Teacher], runtime: Runtime, temperature: float):
        self.teachers = list(teachers)
        self.runtime = runtime
        self.temperature = temperature
        self.views = [t.preprocess for t in self.teachers]
        self._clock = _DeviceClock(runtime)

    def __call__(self, batch) -> torch.Tensor:
        if batch.views is None:
            raise RuntimeError("online targets need a loader built with the teachers' renderer (views=...)")
        with self._clock:
            probs = teacher_probs(self.teachers, batch.views, self.runtime, self.temperature)
            # clone(): the inference-mode result becomes a normal tensor the loss may save for backward
            return probs.mean(0).clone()

    def times(self) -> dict[str, float]:
        """Teacher time so far (device time on CUDA); syncs on CUDA, so the loop asks on log steps only."""
        return {"teacher_s": self._clock.seconds()}

    def identity(self) -> dict[str, Any]:
        """What a resumed run must match (recorded in the checkpoint metadata)."""
        return {"teachers": [t.identity() for t in self.teachers],
                "ensemble": {"rule": RULE, "temperature": self.temperature}}


class _DeviceClock:
    """Accumulated time of a stretch of work: CUDA events on a GPU (kernels are timed when they
    run, not when launched, with no sync per step); wall clock on a CPU."""

    def __init__(self, runtime: Runtime):
        self.cuda = runtime.is_cuda
        self.total = 0.0
        self.pending: list[tuple[Any, Any]] = []

    def __enter__(self):
        if self.cuda:
            self.start = torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.pending.append((self.start, end))
        else:
            self.total += time.perf_counter() - self.start

    def seconds(self) -> float:
        if self.pending:
            self.pending[-1][1].synchronize()
            self.total += sum(a.elapsed_time(b) for a, b in self.pending) / 1000.0
            self.pending.clear()
        return self.total
