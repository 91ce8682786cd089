"""benchmarks/bench_crop_budget.py's bookkeeping, without training: budgets, where output goes, the targets, resume."""
from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.bench_crop_budget import Ledger, check_settings, parse_args, summarize

REPO = Path(__file__).resolve().parents[1]


def test_budgets_are_the_issue_set_with_e_folded_in():
    assert parse_args([]).budgets == [1, 2, 4, 8]  # E = 8: C = E is the C = 8 run
    assert parse_args(["--student-epochs", "16"]).budgets == [1, 2, 4, 8, 16]
    assert parse_args(["--student-epochs", "3", "--budgets", "E,1"]).budgets == [1, 3]


def test_full_study_writes_the_docs_and_smoke_only_its_workdir(tmp_path):
    full = parse_args([])
    assert (full.out, full.doc) == (str(REPO / "benchmarks/results/crop_budget.json"), "docs/results.md")
    assert full.plot == str(REPO / "docs/img/crop_budget.png")
    smoke = parse_args(["--smoke", "--workdir", str(tmp_path)])
    for path in (smoke.out, smoke.doc, smoke.plot):
        assert Path(path).parent == tmp_path
    assert smoke.student_epochs == 1 and smoke.train_images < 1000 and smoke.ignore_margin


def test_multi_crop_needs_a_cache_that_large():
    with pytest.raises(SystemExit):
        parse_args(["--student-epochs", "1", "--budgets", "1", "--multi-crop", "2"])


def run(top1, **kw):
    return {"top1": top1, **kw}


def test_targets_from_hand_computed_means():
    args = parse_args([])  # E = 8, budgets 1, 2, 4, 8
    hard, fresh = [run(80.0), run(81.0)], [run(83.0), run(83.4)]  # means 80.5, 83.2
    cached = {1: run(81.0), 2: run(82.5), 4: run(83.0), 8: run(83.3)}
    best_runs = [cached[8], run(83.1)]  # the best C again with seed 1: mean 83.2
    s = summarize(args, 90.0, hard, fresh, run(83.25), cached, 8, best_runs)
    assert s["best_cached_minus_hard"] == pytest.approx(2.7) and s["met_kd"]
    assert s["cached_E_minus_fresh"] == pytest.approx(0.1) and s["met_online"]
    assert s["smallest_C_within_0.3_of_fresh"] == 4  # |83.0 - 83.2| = 0.2; C = 2 is 0.7 below
    far = summarize(args, 90.0, hard, fresh, run(83.25), {**cached, 8: run(82.7)}, 4, [cached[4], run(82.0)])
    assert not far["met_online"] and far["cached_E_minus_fresh"] == pytest.approx(-0.5)
    assert far["best_cached_minus_hard"] == pytest.approx(2.0)


def test_ledger_survives_a_restart(tmp_path):
    ledger = Ledger(tmp_path / "runs.jsonl")
    ledger.add({"key": "hard:seed0", "top1": 80.0})
    ledger.add({"key": "cache:C1", "teacher_s": 12.5})
    again = Ledger(tmp_path / "runs.jsonl")
    assert again.get("hard:seed0") == {"key": "hard:seed0", "top1": 80.0}
    assert again.get("cache:C1")["teacher_s"] == 12.5 and again.get("fresh:seed0") is None


def test_a_workdir_holds_one_study(tmp_path):
    ledger = Ledger(tmp_path / "runs.jsonl")
    check_settings(ledger, parse_args([]))
    check_settings(Ledger(tmp_path / "runs.jsonl"), parse_args(["--seeds", "0,1,2", "--budgets", "1,8"]))  # more runs
    with pytest.raises(SystemExit, match=r"teacher_epochs 4 -> 6.*new --workdir"):
        check_settings(Ledger(tmp_path / "runs.jsonl"), parse_args(["--teacher-epochs", "6"]))


def test_step_keys_name_every_run_and_parse_back():
    from benchmarks.bench_crop_budget import parse_key, step_key

    assert step_key("hard", 1) == "hard:seed1"
    assert step_key("multicrop", 0, 8, 2) == "multicrop:seed0:C8:m2"
    assert parse_key("multicrop:seed0:C8:m2") == {"kind": "multicrop", "seed": 0, "C": 8, "m": 2}
    assert parse_key("cached:seed1:C16") == {"kind": "cached", "seed": 1, "C": 16, "m": 1}
    assert parse_key("teacher:regnetx_002") == {"kind": "teacher", "name": "regnetx_002"}
    assert parse_key("cache:C4")["C"] == 4


def test_jobs_run_each_step_in_a_child_with_the_same_arguments(tmp_path, monkeypatch):
    """--jobs 2: a child per unfinished step, the invocation's argv + --step KEY; finished steps are skipped."""
    import subprocess

    from benchmarks import bench_crop_budget as bench

    launched = []

    class Child:
        def __init__(self, cmd, **kw):
            launched.append(cmd)
            key = cmd[cmd.index("--step") + 1]
            Ledger(tmp_path / "runs.jsonl").add({"key": key, "kind": "hard", "top1": 50.0})  # what a child writes
            self.returncode = 0

        def poll(self):
            return self.returncode

    monkeypatch.setattr(subprocess, "Popen", Child)
    monkeypatch.setattr("time.sleep", lambda s: None)
    study = bench.Study.__new__(bench.Study)
    argv = ["--workdir", str(tmp_path), "--jobs", "2"]
    study.args, study.argv, study.wd = parse_args(argv), argv, tmp_path
    study.ledger = Ledger(tmp_path / "runs.jsonl")
    study.ledger.add({"key": "hard:seed0", "kind": "hard", "top1": 40.0})
    rows = study.run(["hard:seed0", "hard:seed1", "hard:seed2"])
    assert [c[-1] for c in launched] == ["hard:seed1", "hard:seed2"]
    assert all(c[c.index("--step") - len(argv):c.index("--step")] == argv for c in launched)
    assert [r["top1"] for r in rows] == [40.0, 50.0, 50.0]


def test_teacher_init_starts_that_teacher_from_its_weights(tmp_path, monkeypatch):
    """--teacher-init NAME=PATH: the teacher's `pipeline train` gets train.weights; the others start random."""
    from benchmarks import bench_crop_budget as bench
    from common.config import load_config

    weights = tmp_path / "best.pt"
    weights.write_bytes(b"")
    with pytest.raises(SystemExit):  # not a teacher of this study
        parse_args(["--teachers", "resnet10t", "--teacher-init", f"regnetx_002={weights}"])
    with pytest.raises(SystemExit):  # no such file
        parse_args(["--teachers", "resnet10t", "--teacher-init", f"resnet10t={tmp_path / 'missing.pt'}"])
    args = parse_args(["--workdir", str(tmp_path), "--teacher-epochs", "3", "--teacher-init", f"resnet10t={weights}"])
    trained = {}
    monkeypatch.setattr("stage2_student_distill.train.run_train",
                        lambda cfg: trained.setdefault(cfg.train.model, (cfg.train.weights, cfg.optim.epochs)))
    monkeypatch.setattr(bench, "run_record", lambda key, run_dir, **fields: {"key": key, **fields})
    study = bench.Study.__new__(bench.Study)
    study.args, study.wd, study.base = args, tmp_path, load_config(None, {})
    study.ledger = Ledger(tmp_path / "runs.jsonl")
    study.teacher("resnet10t")
    study.teacher("regnetx_002")
    assert trained == {"resnet10t": (str(weights), 3), "regnetx_002": ("", 3)}
    assert study.ledger.get("teacher:resnet10t")["init"] == str(weights)
    assert study.ledger.get("teacher:regnetx_002")["init"] is None
    check_settings(study.ledger, args)
    with pytest.raises(SystemExit, match=r"teacher_init \[.*\] -> None"):  # a warm-restarted teacher: another study
        check_settings(Ledger(tmp_path / "runs.jsonl"), parse_args(["--teacher-epochs", "3"]))
