"""The accuracy grid driver (benchmarks/bench_distill_regimes.py) and the disjoint Fashion-MNIST subsets it needs.

The orchestration is tested with a fake step function (no training); one test runs one real, tiny step
through the command line and checks that a rerun does not train again.
"""
from __future__ import annotations

import argparse
import shutil
import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import bench_distill_regimes as grid
from benchmarks.bench_distill_regimes import Regime, Step, TeacherSpec
from stage1_teacher_cache.distill_advice import Condition, Rule
from data_manifests.fashion_mnist import balanced_subset, subset_manifest
from test_fashion_mnist import write_source

# --------------------------------------------------------------------------- the disjoint subsets


def test_skip_takes_the_next_images_of_each_class_disjoint_from_the_first():
    labels = np.array([c for _ in range(10) for c in range(10)])  # image i has label i % 10, 10 a class
    first = balanced_subset(labels, 20)  # 2 a class
    after = balanced_subset(labels, 30, skip=20)  # the next 3 a class
    assert not set(first) & set(after)
    # independently: class c sits at c, c + 10, c + 20, ...; skipping 2 a class leaves rows 2, 3, 4 of each
    assert after.tolist() == sorted(c + 10 * row for c in range(10) for row in (2, 3, 4))
    # an uneven skip: the first 5 classes lose one more, as balanced_subset(labels, 25) takes one more of them
    uneven = balanced_subset(labels, 10, skip=25)
    assert not set(uneven) & set(balanced_subset(labels, 25))
    assert sorted(uneven % 10) == list(range(10))


def test_subset_manifest_with_skip_is_its_own_tree_and_refuses_too_few_images(tmp_path: Path):
    from common.errors import PipelineError
    from common.manifest import load_manifest

    write_source(tmp_path / "src", n_train=60, n_test=20)  # 6 images a class
    students = load_manifest(subset_manifest(tmp_path / "src", tmp_path / "data", "train", 20))
    teachers = load_manifest(subset_manifest(tmp_path / "src", tmp_path / "data", "train", 30, skip=20))
    assert (tmp_path / "data" / "train-30-skip20").is_dir()
    names = lambda m: {Path(p).name for p in m.paths}  # noqa: E731  (file name = index in the idx file)
    assert len(names(students)) == 20 and len(names(teachers)) == 30
    assert not names(students) & names(teachers)
    with pytest.raises(PipelineError, match="after the first 40"):
        subset_manifest(tmp_path / "src", tmp_path / "data", "train", 30, skip=40)


# --------------------------------------------------------------------------- the grid as data


def test_step_keys_round_trip():
    steps = [Step("teacher", "test_resnet-e3-n30000-s30000"), Step("short", "n1000-mid-e40", 0),
             Step("cache", "n1000-mid-e40", C=10), Step("cached", "n1000-mid-e40", 1, C=5),
             Step("cached", "n1000-mid-e40", 0, w=0.25), Step("online", "n60000-plateau-e6", 1)]
    for s in steps:
        assert Step.parse(s.key) == s
    assert Step("cached", "r", 0, w=0.25).key == "cached:r:seed0:w0.25"
    for bad in ("nonsense:r", "hard:r:seed0:x3", "hard"):
        with pytest.raises(ValueError):
            Step.parse(bad)


def test_full_grid_has_the_issues_regimes():
    regimes = grid.full_grid()
    grid.check_grid(regimes)
    train = [r for r in regimes if not r.held_out and not r.pretrain]
    held = [r for r in regimes if r.held_out]
    assert len(train) >= 12 and len(held) >= 4
    assert min(r.images for r in regimes) <= 500 and max(r.images for r in regimes) == 60000
    others = [r for r in train if all(t.skip >= r.images for t in r.teachers)]
    own = [r for r in train if all(t.skip == 0 for t in r.teachers)]
    assert others and own
    crops = [r for r in regimes if r.budgets]
    expected = {40: {5, 10, 20, 40}, 60: {8, 15, 30, 60}}  # E/8, E/4, E/2, E in whole crops
    assert crops and all(expected[r.epochs] <= {r.C, *r.budgets} for r in crops)
    assert [r for r in regimes if r.pretrain and r.images == 60000]


def test_check_grid_refuses_overlapping_teachers_and_repeated_names():
    t = TeacherSpec("test_resnet", 1, 100, skip=50)
    with pytest.raises(ValueError, match="overlap"):
        grid.check_grid([Regime("a", 100, (t,), 4)])
    ok = Regime("a", 50, (t,), 4)
    with pytest.raises(ValueError, match="repeat"):
        grid.check_grid([ok, ok])
    twice = Regime("b", 50, (t, TeacherSpec("test_resnet", 3, 100, skip=50)), 4)  # stage 1 refuses a name twice
    with pytest.raises(ValueError, match="repeat an architecture"):
        grid.check_grid([twice])
    grid.check_grid(grid.full_grid())


# --------------------------------------------------------------------------- resumption and the phases


def fake_grid(tmp_path: Path, regimes, top1) -> tuple[grid.Grid, list[str]]:
    """A Grid whose steps record ``top1(step)`` instead of training; the keys it ran, in order."""
    args = argparse.Namespace(workdir=str(tmp_path / "wd"), jobs=1)
    g = grid.Grid(args, [], regimes)
    ran = []

    def step(key: str) -> dict:
        ran.append(key)
        s = Step.parse(key)
        if s.kind == "cache":
            cache = tmp_path / "caches" / key.replace(":", "_")
            cache.mkdir(parents=True, exist_ok=True)
            (cache / "zarr.json").write_text("{}")
            return g.record(key, {"kind": "cache", "ensemble_top1": 85.0, "agreement_pct": 90.0, "path": str(cache)})
        if s.kind == "teacher":
            weights = tmp_path / f"{key.replace(':', '_')}.pt"
            weights.write_bytes(b"")
            return g.record(key, {"kind": "teacher", "weights": str(weights), "top1": top1(s)})
        return g.record(key, {"kind": s.kind, "top1": top1(s)})

    g.step = step
    g.prepare_data = lambda: None
    return g, ran


def test_a_rerun_skips_finished_steps(tmp_path: Path):
    regimes = [Regime("r", 100, (TeacherSpec("test_resnet", 1, 100),), 4)]
    g, ran = fake_grid(tmp_path, regimes, lambda s: 50.0)
    g.record("hard:r:seed0", {"kind": "hard", "top1": 60.0})  # finished by an earlier invocation
    rows = g.run([Step("hard", "r", 0), Step("short", "r", 0)])
    assert ran == ["short:r:seed0"] and rows["hard:r:seed0"]["top1"] == 60.0
    g2, ran2 = fake_grid(tmp_path, regimes, lambda s: 50.0)  # a new invocation on the same workdir
    g2.run([Step("hard", "r", 0), Step("short", "r", 0)])
    assert ran2 == []


def test_a_later_session_redoes_the_steps_whose_files_are_gone_and_keeps_the_students(tmp_path: Path):
    regimes = [Regime("r", 100, (TeacherSpec("test_resnet", 1, 100),), 4)]
    g, _ = fake_grid(tmp_path, regimes, lambda s: 50.0)
    first = g.all()
    teacher, cache = (next(k for k in first if k.startswith(kind)) for kind in ("teacher:", "cache:"))
    Path(first[teacher]["weights"]).unlink()  # a new machine: the records came through git, the files did not
    shutil.rmtree(first[cache]["path"])
    g2, ran = fake_grid(tmp_path, regimes, lambda s: 0.0)
    g2.all()
    assert ran == [teacher, cache]  # the students (top1 50.0) are kept
    assert all(g2.done(k)["top1"] == 50.0 for k in first if Step.parse(k).kind in ("hard", "cached", "online"))


def test_seed1_where_the_gain_is_under_a_point_and_label_weights_on_the_extremes(tmp_path: Path):
    t = TeacherSpec("test_resnet", 1, 100)
    regimes = [Regime("close", 100, (t,), 4), Regime("wins", 100, (t,), 4), Regime("loses", 100, (t,), 4),
               Regime("held", 100, (t,), 4, held_out=True)]
    cached = {"close": 80.5, "wins": 83.0, "loses": 77.0, "held": 82.0}
    g, ran = fake_grid(tmp_path, regimes, lambda s: cached[s.name] if s.kind == "cached" else 80.0)
    done = g.all()
    seed1 = {Step.parse(k).name for k in ran if Step.parse(k).seed == 1}
    assert seed1 == {"close"}
    weighted = {(Step.parse(k).name, Step.parse(k).w) for k in ran if Step.parse(k).w is not None}
    assert weighted == {(n, w) for n in ("wins", "loses") for w in grid.LABEL_WEIGHTS}
    assert ran.index("teacher:" + t.name) < ran.index("cache:close:C1") < ran.index("cached:close:seed0")
    g2, ran2 = fake_grid(tmp_path, regimes, lambda s: 0.0)
    assert g2.all().keys() >= done.keys() and ran2 == []


# --------------------------------------------------------------------------- the rule


def rows_from(features: list[dict], rule) -> list[dict]:
    return [{"regime": f"r{i}", "features": f, "gain": 1.0 if rule(f) else -1.0, "held_out": False,
             "pretrain": False} for i, f in enumerate(features)]


def test_search_finds_a_known_two_feature_rule_and_it_holds_out():
    rng = np.random.default_rng(0)
    truth = lambda f: f["margin"] > 2.0 and f["agreement"] > 80.0  # noqa: E731
    # training points kept off the thresholds, so the true rule is the only perfect one with a wide margin
    points = [{"ensemble": float(rng.uniform(70, 90)), "short_hard": float(rng.uniform(70, 90)),
               "agreement": float(rng.choice([rng.uniform(60, 78), rng.uniform(82, 98)])),
               "margin": float(rng.choice([rng.uniform(-5, 1), rng.uniform(3, 8)]))} for _ in range(24)]
    rule = grid.search_rule(rows_from(points, truth), features=("ensemble", "agreement", "short_hard", "margin"))
    assert rule.accuracy == 1.0
    assert rule.op == "and" and {c.feature for c in rule.conditions} == {"margin", "agreement"}
    thresholds = {c.feature: c.threshold for c in rule.conditions}
    assert 1.0 < thresholds["margin"] < 3.0 and 78.0 < thresholds["agreement"] < 82.0
    held = rows_from([{"ensemble": 80.0, "short_hard": 80.0, "agreement": a, "margin": m}
                      for a, m in ((95, 6), (70, 6), (95, -3), (70, -3))], truth)
    assert all(c["hit"] for c in grid.evaluate_rule(rule, held))


def test_search_prefers_one_feature_then_the_wider_margin():
    # both features separate the rows perfectly; "agreement" leaves a gap of half its range, "margin" a tenth
    rows = rows_from([{"agreement": a, "margin": m} for a, m in ((0, 0), (10, 1), (60, 1.2), (100, 10))],
                     lambda f: f["agreement"] > 30)
    rule = grid.search_rule(rows, features=("margin", "agreement"))
    assert len(rule.conditions) == 1 and rule.conditions[0].feature == "agreement"
    assert rule.conditions[0].threshold == 35.0 and rule.conditions[0].above
    assert rule.margin == pytest.approx(25 / 100)


def test_evaluate_rule_reports_hits_and_misses():
    rule = Rule((Condition("margin", 2.0, True),))
    rows = rows_from([{"margin": 5.0}, {"margin": 0.0}], lambda f: True)  # both gained: the second is a miss
    assert [(c["call"], c["actual"], c["hit"]) for c in grid.evaluate_rule(rule, rows)] == [
        ("gain", "gain", True), ("loss", "gain", False)]
    assert str(rule) == "distil when margin > 2.00"


# --------------------------------------------------------------------------- the report


def synthetic_done(regimes) -> dict:
    """Records of every step, gains chosen so that a margin threshold separates the clear outcomes except on
    held-out 'h2'; 'b' and 'c' are ties (under a point either way)."""
    margin = {"a": 6.0, "b": 5.0, "c": 1.0, "d": -1.0, "h1": 8.0, "h2": 0.0}
    gain = {"a": 1.5, "b": 0.8, "c": -0.7, "d": -2.0, "h1": 2.0, "h2": 1.5}
    done = {}
    for r in regimes:
        done[Step("cache", r.name, C=r.C).key] = {"ensemble_top1": 80.0 + margin[r.name], "agreement_pct": 85.0}
        done[Step("short", r.name, 0).key] = {"top1": 80.0}
        for s in (0, 1):
            done[Step("hard", r.name, s).key] = {"top1": 78.0 + s}
            done[Step("cached", r.name, s).key] = {"top1": 78.0 + s + gain[r.name]}
            done[Step("online", r.name, s).key] = {"top1": 78.5 + s}
    return done


def test_report_on_synthetic_results(tmp_path: Path):
    t = TeacherSpec("test_resnet", 1, 100)
    regimes = [Regime(n, 100, (t,), 4) for n in "abcd"] + [Regime(n, 100, (t,), 4, held_out=True)
                                                           for n in ("h1", "h2")]
    rows = grid.regime_rows(regimes, synthetic_done(regimes))
    assert rows[0]["gain"] == pytest.approx(1.5) and rows[0]["online_gain"] == pytest.approx(0.5)
    assert rows[0]["features"]["margin"] == pytest.approx(6.0) and rows[0]["seeds"] == [0, 1]
    analysis = grid.analyse(rows)
    # the clear outcomes are a (+1.5, margin 6) and d (-2.0, margin -1): the threshold sits mid-gap
    assert analysis["rule"] == "distil when margin > 2.50" and analysis["train_accuracy"] == 1.0
    assert analysis["train_judged"] == 2 and analysis["calls"]["b"]["hit"] is None  # b, c: ties
    assert (analysis["held_out_hits"], analysis["held_out_total"]) == (1, 2)
    assert analysis["calls"]["h2"] == {"regime": "h2", "call": "loss", "actual": "gain", "hit": False}
    # counted by sign, b's +0.8 is a gain and c's -0.7 a loss: the threshold moves between them
    assert analysis["sign_target"]["rule"] == "distil when margin > 3.00"
    # points given away per training regime following the rule: b's 0.8 (called a gain? no: 5 > 2.5, a gain,
    # right) and c's 0.7 (margin 1 <= 2.5: kept labels, right) -> nothing; always distilling gives c and d away
    assert analysis["points_lost"]["training"] == {"rule": 0.0, "always": pytest.approx((0.7 + 2.0) / 4),
                                                   "never": pytest.approx((1.5 + 0.8) / 4)}
    payload = json.loads(json.dumps({"regimes": rows, "analysis": analysis, "plot": "p.png"}))  # as from the JSON
    text = grid.report(payload)
    assert "| h2 | yes | 80.00 | 85.00 | 80.00 | +0.00 | 0,1 | 78.50 | 80.00 | 79.00 | +1.50 | +0.50 | loss | MISS |" \
        in text
    assert "| b |  | 85.00 | 85.00 | 80.00 | +5.00 | 0,1 | 78.50 | 79.30 | 79.00 | +0.80 | +0.50 | gain | tie |" in text
    assert "held out: 1 of 2 right" in text
    # docs/teachers.md's table: by margin, largest first, the rule's call in the user's words
    table = grid.margin_table(payload).splitlines()
    body = [line for line in table if line.startswith("| ") and not line.startswith("| regime")]
    assert [line.split(" | ")[0][2:] for line in body] == ["h1", "a", "b", "c", "h2", "d"]  # margins 8 6 5 1 0 -1
    assert body[4] == "| h2 | yes | 80.00 | 80.00 | +0.00 | 78.50 | +1.50 | +0.50 | keep labels | **no** |"
    assert body[2] == "| b |  | 85.00 | 80.00 | +5.00 | 78.50 | +0.80 | +0.50 | distil | tie: either |"
    assert "on 1 of 2 held out" in table[0] and table[-1] == "![gain against margin](p.png)"
    lines = grid.rule_lines(analysis, 4)
    assert any("points given away per regime" in line for line in lines)
    png = grid.plot_gain(payload, tmp_path / "gain.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plan_covers_every_step_with_a_cost():
    text, minutes = grid.plan_table(grid.full_grid(), 10000, jobs=2)
    assert "pre:n60000-plateau-e6:seed0" in text and "cache:n1000-mid-e40:C40" in text
    # an upper bound (every regime's second seed, rates measured on loaded cores): the whole grid, item 4's
    # 12 + 12 epochs included, recorded 256 core-minutes of steps, about 2.1 hours of 2 cores (docs/results.md)
    assert 120 < minutes / 2 < 300


# --------------------------------------------------------------------------- one real step


def test_one_real_step_through_the_command_line_and_no_retraining_on_rerun(tmp_path: Path):
    write_source(tmp_path / "src", n_train=600, n_test=40)
    argv = ["--smoke", "--source", str(tmp_path / "src"), "--workdir", str(tmp_path / "wd"), "--val-images", "40"]
    key = "short:n200-own-e1:seed0"
    assert grid.main([*argv, "--step", key]) == 0
    record = json.loads((tmp_path / "wd" / "steps" / "short_n200-own-e1_seed0.json").read_text())
    assert record["epochs"] == 1 and record["top1"] is not None and record["seconds"] is not None
    assert grid.main([*argv, "--step", key]) == 0  # the run is complete: ex.train does not start it again
    again = json.loads((tmp_path / "wd" / "steps" / "short_n200-own-e1_seed0.json").read_text())
    assert again["seconds"] is None and again["top1"] == record["top1"]


def test_a_grid_of_ties_is_judged_by_sign_and_says_so():
    t = TeacherSpec("test_resnet", 1, 100)
    regimes = [Regime(n, 100, (t,), 4) for n in "abcd"] + [Regime("h1", 100, (t,), 4, held_out=True),
                                                           Regime("h2", 100, (t,), 4, held_out=True)]
    done = synthetic_done(regimes)
    for r in regimes:  # every cached run within half a point of its hard-label run
        for s in (0, 1):
            done[Step("cached", r.name, s).key]["top1"] = done[Step("hard", r.name, s).key]["top1"] + (
                0.4 if r.name in ("a", "b", "h1") else -0.4)
    analysis = grid.analyse(grid.regime_rows(regimes, done))
    assert analysis["tie_points"] == 0.0 and analysis["train_accuracy"] == 1.0
    assert "(every gain > 0 a gain)" in grid.rule_lines(analysis, 4)[0]
