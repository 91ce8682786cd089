"""``distill.label_weight``: loss = KL to the targets + w * cross entropy to the hard label (+ discriminator).

Expected values are computed by hand in float64 numpy from the formulas, not
from the objective: KL(t || q) = sum_k t_k (log t_k - log q_k), CE = -log q_y,
both averaged over the batch, and d/ds_k of (KL + w CE) = (q_k - t_k + w (q_k - y_k)) / B.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from stage2_student_distill.app.cli import main
from common.manifest import ManifestRow, write_manifest
from stage2_student_distill.discriminator import Discriminator
from stage2_student_distill.losses import DistillObjective, cutmix, discriminator_loss
from stage2_student_distill.metrics import read_metrics
from stage2_student_distill.targets import CachedTargets, WithHardLabels
from stage2_student_distill.train import run_distill
from test_distill import data, distill_config  # noqa: F401  (the module-scoped tiny cache fixture)

B, K = 4, 5
LOGITS = np.array([[0.3, -1.2, 2.0, 0.1, -0.4],
                   [1.5, 0.2, -0.7, 0.0, 0.9],
                   [-0.3, -0.3, 0.8, 2.2, -1.0],
                   [0.0, 1.1, 0.4, -2.0, 0.6]])
TARGETS = np.array([[0.1, 0.0, 0.7, 0.15, 0.05],
                    [0.6, 0.1, 0.0, 0.1, 0.2],
                    [0.05, 0.05, 0.2, 0.6, 0.1],
                    [0.2, 0.5, 0.1, 0.0, 0.2]])
LABELS = np.array([2, 4, 3, 1])  # row 1's label disagrees with its target's top-1


def _hand(w: float) -> tuple[float, float, float, np.ndarray]:
    q = np.exp(LOGITS) / np.exp(LOGITS).sum(-1, keepdims=True)
    t = TARGETS
    kl = sum(t[b, k] * (np.log(t[b, k]) - np.log(q[b, k])) for b in range(B) for k in range(K) if t[b, k] > 0) / B
    ce = -sum(np.log(q[b, LABELS[b]]) for b in range(B)) / B
    y = np.eye(K)[LABELS]
    grad = (q - t + w * (q - y)) / B
    return kl + w * ce, kl, ce, grad


def _batch():
    return type("Batch", (), {"targets": torch.tensor(TARGETS, dtype=torch.float32),
                              "labels": torch.tensor(LABELS)})()


@pytest.mark.parametrize("w", [0.25, 1.0])
def test_loss_and_gradient_equal_the_hand_computation(w):
    targets = WithHardLabels(CachedTargets("CACHE"), K)(_batch())
    assert targets.shape == (B, 2 * K)
    logits = torch.tensor(LOGITS, dtype=torch.float32, requires_grad=True)
    objective = DistillObjective(None, label_weight=w)
    loss, parts = objective(logits, targets)
    loss.backward()
    total, kl, ce, grad = _hand(w)
    assert objective.parts == ("loss", "kl", "ce")
    assert loss.item() == pytest.approx(total, rel=1e-5)
    assert parts.tolist() == pytest.approx([total, kl, ce], rel=1e-5)
    np.testing.assert_allclose(logits.grad.numpy(), grad, rtol=1e-4, atol=1e-7)


def test_weight_zero_is_plain_meal_v2_and_the_discriminator_sees_only_the_soft_half():
    logits = torch.tensor(LOGITS, dtype=torch.float32)
    soft = torch.tensor(TARGETS, dtype=torch.float32)
    kl = _hand(0.0)[1]
    loss, parts = DistillObjective(None)(logits, soft)
    assert loss.item() == pytest.approx(kl, rel=1e-5) and parts.tolist() == pytest.approx([kl, kl], rel=1e-5)

    torch.manual_seed(0)
    disc = Discriminator(K)
    objective = DistillObjective(disc, label_weight=0.5)
    loss, parts = objective(logits, WithHardLabels(CachedTargets("CACHE"), K)(_batch()))
    d_loss = discriminator_loss(disc, F.softmax(logits, -1), soft).item()
    total, kl, ce, _ = _hand(0.5)
    assert objective.parts == ("loss", "kl", "ce", "d_loss")
    assert parts.tolist() == pytest.approx([total + d_loss, kl, ce, d_loss], rel=1e-5)


def test_cutmix_mixes_label_and_soft_target_by_the_same_area():
    targets = WithHardLabels(CachedTargets("CACHE"), K)(_batch())
    images = torch.arange(B, dtype=torch.float32).reshape(B, 1, 1, 1).expand(B, 3, 8, 8).contiguous()
    mixed_images, mixed = cutmix(images, targets, prob=1.0, alpha=1.0, rng=np.random.default_rng(3))
    # each image is now a blend of itself and one partner: recover the kept share from the pixels
    for b in range(B):
        own = float((mixed_images[b, 0] == b).float().mean())
        partner = int(mixed_images[b, 0][mixed_images[b, 0] != b][0]) if own < 1 else b
        expect = own * targets[b] + (1 - own) * targets[partner]
        assert torch.allclose(mixed[b], expect, atol=1e-6)
        assert mixed[b, K:].sum().item() == pytest.approx(1.0, abs=1e-6)  # still a label distribution


def test_distill_cli_records_the_ce_term_and_refuses_unlabelled_images(data, tmp_path):  # noqa: F811
    out = tmp_path / "w1"
    run_distill(distill_config(data, out, **{"optim.epochs": 1, "distill.label_weight": 1.0}))
    (record,) = read_metrics(out / "metrics.jsonl")
    assert record["train_loss"] == pytest.approx(record["train_kl"] + record["train_ce"] + record["train_d_loss"],
                                                 rel=1e-5)
    assert json.loads((out / "config.json").read_text())["distill"]["label_weight"] == 1.0

    unlabeled = tmp_path / "unlabeled.parquet"
    rows = [ManifestRow(path=f"img{i}.png", label=-1 if i == 1 else i % 3, width=8, height=8, bytes=10, sha256="0" * 64)
            for i in range(3)]
    write_manifest(rows, ["ant", "bee", "cat"], tmp_path, unlabeled)
    result = CliRunner().invoke(main, ["--set", "runtime.device=cpu", "distill", "--manifest", str(unlabeled),
                                       "--val-manifest", str(data["val"]), "--cache", str(data["cache"]),
                                       "--out", str(tmp_path / "refused"), "--label-weight", "0.5"])
    assert result.exit_code == 1
    assert "1 images have no label (-1)" in result.output and "label_weight" in result.output
    assert not (tmp_path / "refused").exists()
    bad = CliRunner().invoke(main, ["distill", "--label-weight", "-1"])
    assert bad.exit_code == 1 and "label_weight" in bad.output
