"""Where a distill step's soft targets come from: the teacher cache, or the teachers themselves.

The training loop asks ``job.targets(batch)`` for dense [B, K] float32 targets
and does not care which source answers:

* :class:`CachedTargets`: the cache's top-k, restored by the loader (the
  product's main path; no teacher is loaded);
* :class:`OnlineTargets`: online MEAL V2. The loader renders every crop of the
  batch at each teacher's size and interpolation too (``views``), from the same
  decode as the student's, in its background thread; here the ensemble runs on those views under
  inference_mode (bf16 + channels_last on CUDA, as stage 1) and the *full*
  mean softmax (``stage1_teacher_cache.ensemble.teacher_probs``) is the target.
  Which crops: fresh seeded ones (the loader's mode "train": crop index
  epoch * m + j of ``[crops]``) or a cache's boxes (mode "distill",
  ``--replay-cache``): one code path for every variant.

Hard-label training keeps its objective's one-hot targets (losses.py); :class:`WithHardLabels`
appends them to either source for ``distill.label_weight``.
"""
from __future__ import annotations

import time
from typing import Any, Sequence

import torch

from common.runtime import Runtime
from stage2_student_distill.losses import smooth_one_hot
from stage1_teacher_cache.ensemble import RULE, teacher_probs
from stage1_teacher_cache.teachers import Teacher


class CachedTargets:
    """The cache's soft targets, restored to dense rows by the loader (mode "distill")."""

    kind = "cached"

    def __call__(self, batch) -> torch.Tensor:
        return batch.targets

    def seconds(self) -> float:
        return 0.0


class WithHardLabels:
    """A target source with each row's one-hot label appended: [B, 2K] = [soft | one_hot].

    For ``distill.label_weight`` > 0 (losses.DistillObjective splits the two
    halves); carried as one tensor so CutMix mixes label and soft target by
    the same area. Every image must have a label (setup checks).
    """

    def __init__(self, source, num_classes: int):
        self.source = source
        self.num_classes = num_classes
        self.kind = source.kind

    def __call__(self, batch) -> torch.Tensor:
        return torch.cat([self.source(batch), smooth_one_hot(batch.labels, self.num_classes)], dim=-1)

    def seconds(self) -> float:
        return self.source.seconds()


class OnlineTargets:
    """The teachers' mean softmax on the batch's crops, computed in the loop.

    ``views`` is the loader's hook: each teacher's :class:`~common.models.Preprocess`,
    rendered by the loader beside the student's view; ``__call__`` runs the
    ensemble on the views the loader attached to the batch.
    """

    kind = "online"

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

    def seconds(self) -> float:
        """Teacher time so far (device time on CUDA); syncs on CUDA, so call it on log steps only."""
        return self._clock.seconds()

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
