"""Stored float16 top-k never claims more mass than the ensemble gave it."""
import numpy as np

from common.cache_storage import restore_targets, round_down_fp16


def test_round_down_keeps_mass_below_the_true_mass():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2000, 100)) * 4
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    top = np.sort(p, axis=1)[:, ::-1][:, :20].astype(np.float32)
    stored = round_down_fp16(top)
    assert stored.dtype == np.float16
    assert (stored.astype(np.float32) <= top).all()
    ulp = np.spacing(top.astype(np.float16)).astype(np.float32)
    assert (top - stored.astype(np.float32) <= ulp).all()  # at most one float16 step below
    # nearest rounding would overshoot for some rows; ours never does
    assert (stored.astype(np.float64).sum(1) <= top.astype(np.float64).sum(1) + 1e-9).all()


def test_restored_targets_give_every_class_a_share():
    idx = np.array([[0, 1, 2]])
    prob = round_down_fp16(np.array([[0.7, 0.2, 0.1 - 1e-6]], dtype=np.float32))
    dense = restore_targets(idx, prob, num_classes=10)
    assert abs(float(dense.sum()) - 1.0) < 1e-6
    assert (dense[0, 3:] > 0).all()
    assert np.allclose(dense[0, :3].numpy(), prob[0].astype(np.float32), atol=1e-6)
