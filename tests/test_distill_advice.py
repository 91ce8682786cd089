"""Will distilling pay? The measured rule's advice, alone and through teacher-cache and distill.

Expected figures are counted by hand: teachers whose outputs are constant ("always ant", "always cat") on
manifests whose class counts are known, so their top-1 and their agreement with the labels are fractions of
those counts; the advice's verdict then follows from the rule's own thresholds.
"""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from stage1_fixtures import SIZES, make_manifest
from stage1_teacher_cache.distill_advice import (
    MEASURED_REPLAYS,
    MEASURED_RULE,
    RELATIVE_FEATURES,
    Condition,
    Rule,
    advise,
    advise_from_cache,
    crop_replays,
    distill_start_lines,
    features_of,
    short_epochs,
)
from stage2_student_distill.app.cli import main
from test_teacher_eval import constant_teacher


def test_features_are_differences_of_the_figures_and_none_where_one_is_missing():
    f = features_of(85.0, 83.5, 74.25)
    assert f == {"ensemble": 85.0, "agreement": 83.5, "short_hard": 74.25, "margin": 10.75,
                 "agreement_margin": 9.25}
    assert features_of(85.0, None, None)["margin"] is None and features_of(None, 80.0, 70.0)["margin"] is None
    assert features_of(None, 80.0, 70.0)["agreement_margin"] == 10.0


def test_the_tools_rule_uses_only_relative_figures():
    # an absolute top-1 threshold ranks one dataset's regimes and says nothing on another
    assert set(MEASURED_RULE.features) <= set(RELATIVE_FEATURES)


def test_advice_on_both_sides_of_a_threshold_and_with_a_figure_missing():
    rule = Rule((Condition("margin", 5.0, above=True),))
    assert advise(80.0, 90.0, 74.0, 40, rule).verdict == "gain"  # margin 6 > 5
    assert advise(80.0, 90.0, 74.0, 40, rule).lines == ()
    loss = advise(80.0, 90.0, 75.0, 40, rule, where="on 10000 evaluation images")  # margin 5: not above 5
    assert loss.verdict == "loss"
    assert loss.lines[0].startswith("warning: distilling is not expected to beat hard labels here: ensemble "
                                    "80.00% on 10000 evaluation images; short hard-label run 75.00% (10 of 40 "
                                    "epochs); margin +5.00 points; label agreement 90.00% of crops.")
    assert "\"distil when margin > 5.00\"" in loss.lines[0]
    assert "keep the hard labels" in loss.lines[1]
    unknown = advise(80.0, 90.0, None, 40, rule)
    assert unknown.verdict == "unknown" and unknown.missing == ("short_hard",)
    assert "`pipeline train --epochs 10` (E/4)" in unknown.lines[0] and unknown.lines[0].startswith("note: ")
    assert advise(None, None, 70.0, 40, rule).missing == ("ensemble",)
    # a rule on the agreement asks for what it needs, and only that
    on_agreement = Rule((Condition("agreement_margin", 5.0, above=True),))
    assert advise(None, None, None, 8, on_agreement).missing == ("agreement", "short_hard")
    assert advise(None, 80.0, 70.0, 8, on_agreement).verdict == "gain"


def test_short_runs_are_a_quarter_of_the_epochs_and_at_least_one():
    assert [short_epochs(e) for e in (1, 3, 4, 8, 60, 180)] == [1, 1, 1, 2, 15, 45]


def test_advice_from_a_caches_attributes_reads_old_fraction_records():
    attrs = {"teacher_eval": {"ensemble": {"top1": 0.8571, "top5": 0.99}, "manifest": {"num_images": 10000}},
             "label_agreement": {"crops_pct": 84.95}}  # a record from before percent was stored
    advice = advise_from_cache(attrs, 70.72, 60)
    assert advice.features["ensemble"] == pytest.approx(85.71) and advice.features["agreement"] == 84.95
    assert advice.features["margin"] == pytest.approx(14.99)
    assert advise_from_cache({}, 70.0, 60).missing == ("ensemble",)  # built without --evaluate-teachers


# --------------------------------------------------------------------------- through the commands


def cli(*args: str):
    return CliRunner().invoke(main, ["--set", "runtime.progress=false", "--set", "runtime.device=cpu", *args])


def build(tmp_path, name: str, bias: list[float], hard_top1: float):
    """A cache of one constant teacher on 4 training images (ant, bee, cat, ant), scored on 4 validation
    images (ant, bee, cat, ant) before caching; the short hard-label run's top-1 given as ``hard_top1``."""
    train = make_manifest(tmp_path, "train", sizes=SIZES[:4])
    val = make_manifest(tmp_path, "val", sizes=SIZES[:4], seed=1)
    cache = tmp_path / f"cache-{name}"
    built = cli("--set", "teacher_cache.min_top1_over_chance=0", "--set", "optim.epochs=8", "teacher-cache",
                "--teachers", "test_resnet", "--teacher-weights", constant_teacher("test_resnet", bias,
                                                                                  tmp_path / f"{name}.pt"),
                "--input-size", "test_resnet=32", "--manifest", str(train), "--out", str(cache), "--num-crops", "2",
                "--loader", "torch", "--evaluate-teachers", str(val), "--hard-label-top1", str(hard_top1))
    assert built.exit_code == 0, built.output
    return train, val, cache, built


def test_the_warning_fires_on_a_cache_that_disagrees_with_the_labels_and_not_on_one_that_agrees(tmp_path):
    assert all(c.above and c.feature in RELATIVE_FEATURES for c in MEASURED_RULE.conditions), \
        "the figures below are chosen for a rule of 'figure > threshold' conditions"
    # "always ant" is right on 2 of 4 images, training and validation alike (ensemble 50%, agreement 50%);
    # "always cat" on 1 of 4 (25%, 25%). A short run 5 points under the rule's bar for the first sits 20
    # points over the second's.
    hard = 50.0 - max(c.threshold for c in MEASURED_RULE.conditions) - 5.0
    assert MEASURED_RULE.predicts_gain(features_of(50.0, 50.0, hard))
    assert not MEASURED_RULE.predicts_gain(features_of(25.0, 25.0, hard))
    for name, bias, warned in (("ant", [2, 0, 0], False), ("cat", [0, 0, 2], True)):
        train, val, cache, built = build(tmp_path / name, name, bias, hard)
        assert ("warning: distilling is not expected to beat hard labels" in built.stderr) is warned, built.stderr
        if warned:  # before the cache was paid for: the advice precedes the cache's summary
            assert f"ensemble {25.0:.2f}% on 4 evaluation images; short hard-label run {hard:.2f}% (2 of 8 epochs)" \
                in built.stderr
        # distill says it again at start, from the cache's own attributes (the agreement included)
        ran = cli("distill", "--manifest", str(train), "--val-manifest", str(val), "--cache", str(cache),
                  "--student", "test_resnet", "--out", str(tmp_path / name / "run"), "--epochs", "1",
                  "--batch-size", "4", "--img-size", "32", "--loader", "torch", "--num-workers", "0",
                  "--hard-label-top1", str(hard))
        assert ran.exit_code == 0, ran.output
        assert ("warning: distilling is not expected to beat hard labels" in ran.stderr) is warned, ran.stderr
        if warned:
            assert f"label agreement {25.0:.2f}% of crops" in ran.stderr


def test_without_a_short_run_stage1_says_how_to_get_one_and_distill_stays_quiet(tmp_path):
    train, val, cache, built = build(tmp_path, "cat", [0, 0, 2], 0.0)  # 0: not measured
    assert "note: to check whether distilling will beat hard labels" in built.stderr
    assert "`pipeline train --epochs 2` (E/4)" in built.stderr
    assert "warning: distilling" not in built.stderr
    # distill notes nothing it cannot judge: its stderr is kept for what needs acting on (a one-line error)
    ran = cli("distill", "--manifest", str(train), "--val-manifest", str(val), "--cache", str(cache),
              "--student", "test_resnet", "--out", str(tmp_path / "run"), "--epochs", "1", "--batch-size", "4",
              "--img-size", "32", "--loader", "torch", "--num-workers", "0")
    assert ran.exit_code == 0, ran.output
    assert "note: to check" not in ran.stderr and "warning: distilling" not in ran.stderr
    # 36 epochs over C = 2 crops: each crop comes back 18 times, beyond the 8 measured; C >= 36 / 8 -> 5
    lines = distill_start_lines({}, None, 36, 1, 2)
    assert lines == [f"note: each cached crop comes back 18 times (36 epochs x 1 crops per image / C = 2); no loss "
                     f"against fresh crops was measured up to {MEASURED_REPLAYS} (docs/teachers.md, \"Crops against "
                     "epochs\"). Beyond it is unmeasured: `teacher-cache --more-crops N` grows the cache to C >= 5"]
    assert distill_start_lines({}, None, 16, 1, 2) == []  # 8 replays: measured
    assert crop_replays(23, 8, 200) == pytest.approx(0.92)  # the FKD recipe: every crop about once


@pytest.mark.parametrize("bad, named", [
    ({"teacher_eval": [1, 2]}, "teacher_eval.(record): [1, 2]"),
    ({"teacher_eval": {"unit": "percent", "ensemble": 5}}, "teacher_eval.ensemble: 5"),
    ({"teacher_eval": {"unit": "percent", "ensemble": {"top1": "abc"}}}, "teacher_eval.ensemble: {'top1': 'abc'}"),
    ({"teacher_eval": {"unit": "percent", "ensemble": {"top1": 150.0}}}, "teacher_eval.ensemble.top1: 150.0"),
    ({"teacher_eval": {"ensemble": {"top1": 0.5}, "teachers": {"a": {"top1": True}}}}, "teacher_eval.teachers.a:"),
    ({"label_agreement": {"crops_pct": "x"}}, "label_agreement.crops_pct: 'x'"),
    ({"label_agreement": [1]}, "label_agreement.(record): [1]"),
    ({"label_agreement": {"crops_pct": 80.0, "per_class_pct": [50.0, "x"]}}, "label_agreement.per_class_pct"),
])
def test_a_strangers_advisory_figures_fail_distill_and_info_in_one_line(tmp_path, bad, named):
    from common.cache_format import open_attrs, put_attrs

    train, val, cache, _ = build(tmp_path, "ant", [2, 0, 0], 40.0)
    put_attrs(cache, {**open_attrs(cache), **bad})
    ran = cli("distill", "--manifest", str(train), "--val-manifest", str(val), "--cache", str(cache),
              "--student", "test_resnet", "--out", str(tmp_path / "run"), "--epochs", "1", "--batch-size", "4",
              "--img-size", "32", "--loader", "torch", "--num-workers", "0", "--hard-label-top1", "40")
    assert ran.exit_code == 1 and (ran.exception is None or isinstance(ran.exception, SystemExit))  # no traceback
    assert ran.stderr.strip().splitlines() == [ran.stderr.strip()]  # one line
    assert ran.stderr.startswith(f"Error: {cache}: zarr.json: {named}") and "not written by this tool" in ran.stderr
    assert not (tmp_path / "run" / "last.pt").exists()
    # cache info reads the same records through the same doors
    shown = cli("cache", "info", str(cache))
    assert shown.exit_code == 1 and shown.stderr.startswith(f"Error: {cache}: zarr.json: {named}")


def test_the_tools_rule_is_the_one_the_committed_grid_derives():
    """MEASURED_RULE is re-derived from the grid's committed step records (benchmarks/results/
    distill_regimes_steps), not copied from its report: a rerun that moves the threshold fails here until the
    library's rule is updated with it."""
    import json
    from pathlib import Path

    from benchmarks import bench_distill_regimes as grid

    steps = Path(__file__).resolve().parents[1] / "benchmarks/results/distill_regimes_steps"
    records = {r["key"]: r for r in (json.loads(p.read_text()) for p in steps.glob("*.json"))}
    analysis = grid.analyse(grid.regime_rows(grid.full_grid(), records))
    assert analysis["rule"] == str(MEASURED_RULE)
    assert (analysis["held_out_hits"], analysis["held_out_total"]) == (6, 7)
    assert analysis["train_accuracy"] == MEASURED_RULE.accuracy
