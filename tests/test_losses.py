"""Stage-2 losses, discriminator, CutMix and schedule against reference formulas."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from common.config import OptimConfig
from stage2_student_distill.discriminator import Discriminator, hidden_sizes
from stage2_student_distill.losses import (
    DistillObjective,
    cutmix,
    discriminator_loss,
    kl_to_targets,
    soft_cross_entropy,
)
from stage2_student_distill.schedule import lr_factor, set_learning_rates
from stage2_student_distill.targets import HardLabelTargets


def _targets(batch: int, classes: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.softmax(torch.randn(batch, classes, generator=g) * 2, dim=-1)


def test_kl_matches_torch_and_manual_formula():
    logits = torch.randn(6, 10, generator=torch.Generator().manual_seed(1))
    t = _targets(6, 10)
    t[0] = F.one_hot(torch.tensor(3), 10).float()  # exact zeros: 0 log 0 must be 0
    ours = kl_to_targets(logits, t)
    reference = F.kl_div(F.log_softmax(logits, -1), t, reduction="batchmean")
    q = F.softmax(logits.double(), -1)
    manual = sum(
        sum(float(t[b, k]) * (math.log(float(t[b, k])) - math.log(float(q[b, k]))) for k in range(10) if t[b, k] > 0)
        for b in range(6)
    ) / 6
    assert torch.allclose(ours, reference, atol=1e-6)
    assert ours.item() == pytest.approx(manual, rel=1e-5)
    assert kl_to_targets(torch.log(t + 1e-30), t).item() == pytest.approx(0.0, abs=1e-5)


def test_kl_runs_in_fp32_under_bf16_logits():
    logits = torch.randn(4, 10)
    t = _targets(4, 10)
    out = kl_to_targets(logits.bfloat16(), t)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(kl_to_targets(logits.bfloat16().float(), t).item(), rel=1e-6)


def test_soft_cross_entropy_with_smoothing_equals_torch_cross_entropy():
    logits = torch.randn(8, 5)
    labels = torch.randint(0, 5, (8,))
    for eps in (0.0, 0.1):
        ours = soft_cross_entropy(logits, HardLabelTargets(5, eps)(SimpleNamespace(labels=labels)))
        assert torch.allclose(ours, F.cross_entropy(logits, labels, label_smoothing=eps), atol=1e-6)


def test_discriminator_shapes_match_meal_v2_and_scale_down():
    assert hidden_sizes(1000) == (125, 15)
    d = Discriminator(1000)
    shapes = [tuple(m.weight.shape) for m in d.net if isinstance(m, torch.nn.Linear)]
    assert shapes == [(125, 1000), (15, 125), (2, 15)]
    assert d(torch.rand(3, 1000)).shape == (3, 2)
    assert hidden_sizes(10) == (2, 2)
    assert Discriminator(10)(torch.rand(4, 10)).shape == (4, 2)


def test_discriminator_loss_is_bce_with_student_10_and_target_01_labels():
    torch.manual_seed(0)
    d = Discriminator(10)
    s, t = _targets(4, 10, 1), _targets(4, 10, 2)
    out = d(torch.cat([s, t]))
    labels = torch.tensor([[1.0, 0.0]] * 4 + [[0.0, 1.0]] * 4)
    manual = -(labels * torch.log(torch.sigmoid(out)) + (1 - labels) * torch.log(1 - torch.sigmoid(out))).mean()
    assert torch.allclose(discriminator_loss(d, s, t), manual, atol=1e-6)


# A 3-class example small enough to compute by hand (plain Python math, no torch): two student
# rows, two ensemble targets, and a discriminator 3 -> 2 -> 2 -> 2 (hidden_sizes(3)) whose weights are
# set so that on probability vectors (all >= 0, ReLUs pass them unchanged) it computes
#   out = [2 p0 - p1 + 0.1, -p0 + p1 - 0.1].
LOGITS = [[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]]
TARGETS = [[0.5, 0.3, 0.2], [0.1, 0.7, 0.2]]
W3, B3 = [[2.0, -1.0], [-1.0, 1.0]], [0.1, -0.1]


def _hand_discriminator() -> Discriminator:
    d = Discriminator(3)
    first, second, last = (m for m in d.net if isinstance(m, torch.nn.Linear))
    with torch.no_grad():
        first.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
        second.weight.copy_(torch.eye(2))
        last.weight.copy_(torch.tensor(W3))
        for layer in (first, second):
            layer.bias.zero_()
        last.bias.copy_(torch.tensor(B3))
    return d


def _softmax(row):
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def _disc_out(p):
    return [sum(w * x for w, x in zip(W3[j], p[:2])) + B3[j] for j in range(2)]


def _sigmoid(x):
    return 1 / (1 + math.exp(-x))


def _hand_losses():
    """KL(t || q) per MEAL V2 (mean over rows) and the BCE-with-logits of MEAL V2's discriminatorLoss:
    rows [student; target], labels [1, 0] / [0, 1], mean over all 2B x 2 entries."""
    q = [_softmax(r) for r in LOGITS]
    kl = sum(t * (math.log(t) - math.log(p)) for qr, tr in zip(q, TARGETS) for p, t in zip(qr, tr)) / len(q)
    rows = [(_disc_out(p), (1.0, 0.0)) for p in q] + [(_disc_out(t), (0.0, 1.0)) for t in TARGETS]
    bce = [math.log1p(math.exp(x)) - y * x for out, ys in rows for x, y in zip(out, ys)]  # softplus(x) - y x
    return q, kl, sum(bce) / len(bce)


def test_kl_and_discriminator_loss_by_hand_on_three_classes():
    _, kl, d_loss = _hand_losses()
    assert kl == pytest.approx(0.0662, abs=1e-4)  # on paper: (0.0778 + 0.0547) / 2
    logits, targets = torch.tensor(LOGITS), torch.tensor(TARGETS)
    assert kl_to_targets(logits, targets).item() == pytest.approx(kl, rel=1e-6)
    probs = F.softmax(logits, dim=-1)
    assert discriminator_loss(_hand_discriminator(), probs, targets).item() == pytest.approx(d_loss, rel=1e-6)
    loss, parts = DistillObjective(_hand_discriminator())(logits, targets)
    assert parts.tolist() == pytest.approx([kl + d_loss, kl, d_loss], rel=1e-6)
    assert loss.item() == pytest.approx(kl + d_loss, rel=1e-6)


def test_discriminator_gradient_reaches_the_student():
    """d(kl + d_loss)/d logits by hand: (q - t)/B from the KL, plus the discriminator's student rows
    chained through the softmax. A detached discriminator input loses the second part and fails."""
    q, _, _ = _hand_losses()
    batch, entries = len(q), 2 * len(q) * 2
    expected = []
    for qr, tr in zip(q, TARGETS):
        # BCE-with-logits: d/dx = (sigmoid(x) - y) / entries; the student's label is [1, 0]
        g_out = [(_sigmoid(x) - y) / entries for x, y in zip(_disc_out(qr), (1.0, 0.0))]
        g_q = [W3[0][0] * g_out[0] + W3[1][0] * g_out[1], W3[0][1] * g_out[0] + W3[1][1] * g_out[1], 0.0]
        mean_g = sum(p * g for p, g in zip(qr, g_q))
        g_disc = [p * (g - mean_g) for p, g in zip(qr, g_q)]  # softmax Jacobian: q_j (g_j - sum_i q_i g_i)
        expected.append([(p - t) / batch + g for p, t, g in zip(qr, tr, g_disc)])
        assert max(abs(g) for g in g_disc) > 1e-3  # the discriminator's share is not negligible here
    logits = torch.tensor(LOGITS, requires_grad=True)
    d = _hand_discriminator()
    loss, _ = DistillObjective(d)(logits, torch.tensor(TARGETS))
    loss.backward()
    assert torch.allclose(logits.grad, torch.tensor(expected), atol=1e-7)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in d.net[-1].parameters())
    loss_plain, parts_plain = DistillObjective(None)(logits, torch.tensor(TARGETS))
    assert torch.allclose(loss_plain, kl_to_targets(logits, torch.tensor(TARGETS))) and parts_plain.shape == (2,)


def test_kl_to_fixed_targets_falls_on_a_tiny_model():
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10)
    images = torch.randn(4, 3, 32, 32)
    targets = _targets(4, 10, 3)
    disc = Discriminator(10)
    objective = DistillObjective(disc)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    opt_d = torch.optim.SGD(disc.parameters(), lr=1e-4, momentum=0.9)
    kls = []
    for _ in range(6):
        loss, parts = objective(model(images), targets)
        loss.backward()
        opt.step(), opt_d.step()
        opt.zero_grad(), opt_d.zero_grad()
        kls.append(parts[1].item())
    assert kls[-1] < 0.7 * kls[0]


def test_cutmix_mixes_targets_by_pasted_area():
    images = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).reshape(2, 1, 8, 8)
    targets = torch.eye(2)
    same_images, same_targets = cutmix(images, targets, 0.0, 1.0, np.random.default_rng(0))
    assert same_images is images and same_targets is targets
    for seed in range(5):
        mixed, mixed_t = cutmix(images, targets, 1.0, 1.0, np.random.default_rng(seed))
        pasted = (mixed != images).float().mean(dim=(1, 2, 3))  # fraction of pixels from the other image
        assert torch.allclose(mixed_t.sum(-1), torch.ones(2))
        for b in range(2):
            if pasted[b] > 0:
                assert mixed_t[b, b].item() == pytest.approx(1 - pasted[b].item(), abs=1e-6)
    a, at = cutmix(images, targets, 1.0, 1.0, np.random.default_rng(3))
    b, bt = cutmix(images, targets, 1.0, 1.0, np.random.default_rng(3))
    assert torch.equal(a, b) and torch.equal(at, bt)  # seeded: resume draws the same boxes


def test_hard_label_objective_targets():
    class B:
        labels = torch.tensor([0, 2])

    targets = HardLabelTargets(3, 0.3)
    assert torch.allclose(targets(B), torch.tensor([[0.8, 0.1, 0.1], [0.1, 0.1, 0.8]]))


def test_step_schedule_values():
    o = OptimConfig(epochs=180, lr_decay_epochs=(80, 160), lr_decay_factor=0.1)
    assert lr_factor(o, 0, 0, 100) == 1.0
    assert lr_factor(o, 79, 99, 100) == 1.0
    assert lr_factor(o, 80, 0, 100) == pytest.approx(0.1)
    assert lr_factor(o, 159, 5, 100) == pytest.approx(0.1)
    assert lr_factor(o, 160, 0, 100) == pytest.approx(0.01)


def test_cosine_and_warmup_schedule_values():
    o = OptimConfig(epochs=10, schedule="cosine", warmup_epochs=2)
    assert lr_factor(o, 0, 0, 10) == pytest.approx(0.1)
    assert lr_factor(o, 1, 0, 10) == pytest.approx(0.55)
    assert lr_factor(o, 2, 0, 10) == pytest.approx(1.0)
    assert lr_factor(o, 6, 0, 10) == pytest.approx(0.5)
    assert lr_factor(o, 9, 9, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 7.9 / 8)))
    step_warm = OptimConfig(epochs=10, warmup_epochs=1, lr_decay_epochs=(5,))
    assert lr_factor(step_warm, 0, 5, 10) == pytest.approx(0.55)
    assert lr_factor(step_warm, 5, 0, 10) == pytest.approx(0.1)


def test_discriminator_lr_stays_separate_after_schedule_steps():
    o = OptimConfig(epochs=10, lr=0.01, lr_decay_epochs=(2,), lr_decay_factor=0.1)
    student = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    disc = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    pairs = [(student, 0.01), (disc, 1e-4)]
    for epoch in range(4):
        for step in range(3):
            f = lr_factor(o, epoch, step, 3)
            set_learning_rates(pairs, f)
            assert student.param_groups[0]["lr"] == pytest.approx(0.01 * f)
            assert disc.param_groups[0]["lr"] == pytest.approx(1e-4 * f)
    assert disc.param_groups[0]["lr"] == pytest.approx(1e-5)
    assert student.param_groups[0]["lr"] == pytest.approx(1e-3)
