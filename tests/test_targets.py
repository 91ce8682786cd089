"""Target sources are one protocol (stage2_student_distill/targets.py): the loop asks each the same things.

The loop's side is driven with a source it has never heard of (``Stopwatch``):
what it reports (its own time, ``student_s``, its non-finite hint) must reach
metrics.jsonl, the step log and the one-line error without the loop naming it.
Expected values are counted by hand: 12 images, batch 4 -> 3 steps a epoch, and
the stopwatch adds a fixed 0.25 s a call.
"""
from __future__ import annotations

import ast
import inspect

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import stage2_student_distill.train as train
from stage2_student_distill.checkpoint import RunError
from stage2_student_distill.losses import HardLabelObjective
from stage2_student_distill.metrics import read_metrics
from stage2_student_distill.targets import CachedTargets, HardLabelTargets, TargetSource, WithHardLabels
from test_distill import data, distill_config  # noqa: F401  (the module-scoped tiny manifests + cache)

STEPS = 3  # 12 training images in batches of 4
TICK = 0.25  # seconds the stopwatch says each call took


class Stopwatch(TargetSource):
    """Hard labels that report a made-up time of their own, and NaN on call ``nan_at`` (1-based)."""

    non_finite_hint = " (the stopwatch's targets)"

    def __init__(self, num_classes: int, nan_at: int = 0):
        self.labels = HardLabelTargets(num_classes)
        self.calls, self.nan_at = 0, nan_at

    def __call__(self, batch) -> torch.Tensor:
        self.calls += 1
        targets = self.labels(batch)
        return targets * float("nan") if self.calls == self.nan_at else targets

    def times(self) -> dict[str, float]:
        return {"render_s": TICK * self.calls}


def train_job(data, tmp_path, **extra):  # noqa: F811
    out = tmp_path / "run"
    cfg = distill_config(data, out, **{"train.model": "test_resnet", "train.out": str(out), "optim.epochs": 1,
                                       **extra})
    return train.setup(cfg, "train")


class Labels:
    labels = torch.tensor([2, 0, 1, 2])


def test_hard_label_targets_make_the_objective_torchs_smoothed_cross_entropy():
    logits = torch.tensor(np.random.default_rng(0).normal(size=(4, 3)), dtype=torch.float32)
    loss, parts = HardLabelObjective()(logits, HardLabelTargets(3, 0.2)(Labels))
    expected = F.cross_entropy(logits, Labels.labels, label_smoothing=0.2)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert parts.tolist() == pytest.approx([expected.item()], rel=1e-6)


def test_with_hard_labels_appends_the_one_hot_label_and_keeps_the_sources_time_and_hint():
    source = Stopwatch(3)
    wrapped = WithHardLabels(source, 3)
    targets = wrapped(Labels)
    assert torch.equal(targets, torch.cat([torch.eye(3)[Labels.labels], torch.eye(3)[Labels.labels]], dim=-1))
    assert wrapped.times() == {"render_s": TICK}  # one call so far, through the wrapper
    assert wrapped.non_finite_hint == " (the stopwatch's targets)"
    assert WithHardLabels(CachedTargets("CACHE"), 3).times() == {}


def test_pipeline_train_takes_hard_label_targets_with_the_configured_smoothing(data, tmp_path):  # noqa: F811
    job = train_job(data, tmp_path, **{"train.label_smoothing": 0.3})
    with job.held:
        assert isinstance(job.targets, HardLabelTargets) and job.targets.label_smoothing == 0.3
        assert len(job.train_loader) == STEPS
        assert train.train_one_epoch(job, 0)["times"] == {}  # no time of its own: no timing fields


def test_a_sources_own_time_reaches_metrics_and_the_step_log_beside_student_s(data, tmp_path, capsys):  # noqa: F811
    job = train_job(data, tmp_path)
    job.targets = Stopwatch(3)
    train.fit(job)
    (record,) = read_metrics(job.run_dir / "metrics.jsonl")
    assert list(record)[-4:] == ["img_per_s", "render_s", "student_s", "time_s"]
    assert record["render_s"] == pytest.approx(STEPS * TICK)
    assert record["student_s"] >= 0
    # log_every 2: the step log at step 2 shows the source's time so far (2 calls)
    assert f" render {2 * TICK:.1f}s student " in capsys.readouterr().out


def test_a_sources_non_finite_hint_names_it_in_the_one_line_error(data, tmp_path):  # noqa: F811
    job = train_job(data, tmp_path)
    job.targets = Stopwatch(3, nan_at=2)
    with pytest.raises(RunError) as failure:
        train.fit(job)
    assert str(failure.value) == ("training stopped at epoch 1 step 2 of 3: the loss is nan; that batch's targets "
                                  "are not finite (the stopwatch's targets); nothing was written for epoch 1")


def test_the_loop_never_asks_which_source_it_has():
    """No kind test, isinstance or source class in the loop's code (it had a branch per kind before)."""
    asking = {"kind", "isinstance", "CachedTargets", "OnlineTargets", "HardLabelTargets", "WithHardLabels"}
    for piece in (train._fit, train.train_one_epoch, train.Clock, train.NonFiniteWatch, train.log_step):
        tree = ast.parse(inspect.getsource(piece))
        used = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
        used |= {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
        used |= {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)}  # getattr(x, "kind")
        assert not used & asking, (piece.__name__, used & asking)
