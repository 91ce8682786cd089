"""The benchmarks' harness: one smoke flag, quick results kept apart from recorded ones, medians over rounds;
bench_fashion_mnist's training-crop agreement read from what stage 1 records."""
from __future__ import annotations

import argparse
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import harness
from benchmarks.bench_fashion_mnist import cached_crop_accuracy
from common.cache_format import CacheReader
from common.manifest import load_manifest
from stage1_teacher_cache.label_agreement import record_label_agreement


def parser() -> argparse.ArgumentParser:
    return harness.perf_parser("")


@pytest.mark.parametrize("flag", ["--quick", "--smoke"])
def test_smoke_and_quick_are_one_flag(flag):
    assert parser().parse_args([flag]).quick is True
    assert parser().parse_args([]).quick is False


def test_a_quick_run_never_writes_over_a_recorded_result(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "RESULTS_DIR", tmp_path / "results")
    recorded = harness.write_results("stage1", {"run": "full"})
    quick = harness.write_results("stage1", {"run": "quick"}, quick=True)
    assert recorded == tmp_path / "results" / "stage1.json"
    assert quick == tmp_path / "results" / "quick" / "stage1.json"
    assert '"full"' in recorded.read_text() and '"quick"' in quick.read_text()
    given = tmp_path / "mine.json"
    assert harness.write_results("stage1", {"run": "quick"}, str(given), quick=True) == given


def test_quick_results_are_ignored_by_git():
    ignored = subprocess.run(["git", "check-ignore", "-q", "benchmarks/results/quick/cache.json"], cwd=harness.REPO)
    assert ignored.returncode == 0
    recorded = subprocess.run(["git", "check-ignore", "-q", "benchmarks/results/cache.json"], cwd=harness.REPO)
    assert recorded.returncode == 1


def test_median_over_the_rounds_that_measured_it():
    runs = [{"rate": 3.0}, {"rate": None}, {"rate": 1.0}, {"rate": 10.0}, {}]
    assert harness.median_of(runs, "rate") == 3.0
    assert harness.median_of([{"rate": 1.0}, {"rate": 2.0}], "rate") == 1.5
    assert harness.median_of([{"rate": None}], "rate") is None


def test_training_crop_agreement_is_what_stage1_records(tmp_path):
    described = harness.synthetic_manifest(tmp_path / "m.parquet", num_images=40, num_classes=5, root=tmp_path)
    cache = harness.synthetic_cache(tmp_path / "cache", described, num_crops=3, topk=4, images_per_shard=16)
    manifest = load_manifest(described.path)
    rows = CacheReader(str(cache)).images(np.arange(40))
    # independently: the synthetic rows hold falling probabilities, so column 0 is each crop's top-1
    labels = np.arange(40) % 5
    expected_share = float((rows["topk_index"][..., 0] == labels[:, None]).mean())
    hit = rows["topk_index"] == labels[:, None, None]
    expected_prob = float(np.where(hit, rows["topk_prob"].astype(np.float32), 0).sum(-1).mean())
    assert 0 < expected_share < 1  # the check can tell a wrong label order from a right one

    before = cached_crop_accuracy(cache, str(described.path))  # no attribute yet: counted by the library
    record_label_agreement(str(cache), manifest)
    after = cached_crop_accuracy(cache, str(described.path))  # the attribute stage 1 records
    for got in (before, after):
        assert got["argmax_is_label"] == pytest.approx(expected_share, abs=1e-6)
        assert got["mean_true_class_prob"] == pytest.approx(expected_prob, rel=1e-6)


@pytest.mark.parametrize("name", ["bench_cache", "bench_crop_budget", "bench_fashion_mnist", "bench_memory",
                                  "bench_merge", "bench_recipes", "bench_scaling", "bench_stage1", "bench_stage2",
                                  "bench_topk_student"])
def test_every_benchmark_answers_help_as_a_module(name):
    out = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--help"], cwd=harness.REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage:" in out.stdout
