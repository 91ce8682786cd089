"""Is the ensemble worth distilling from? Leave-one-out figures and the warnings of --evaluate-teachers.

Every expected number here is counted by hand from the chosen softmax rows (or, for the CLI,
from the label counts of a manifest and teachers whose outputs are constant), never from a run.
"""
from __future__ import annotations

import json

import pytest
import timm
import torch
from click.testing import CliRunner

from common.cache_format import CacheReader
from stage2_student_distill.app.cli import main
from common.config import load_config
from stage1_fixtures import SIZES, make_manifest
from stage1_teacher_cache.evaluate import hits_of_probs
from stage1_teacher_cache.teacher_eval import (
    ensemble_warnings,
    format_eval_table,
    student_caught_up,
    summarize_hits,
)
from stage2_student_distill.train import fit, setup

# 3 teachers x 6 images x 4 classes. A and B are good and complementary (A misses image 4, B image 1);
# C is confident and wrong on images 0, 3, 4 and 5 and drags the mean with it on 0, 3 and 4... until
# A and B outvote it on image 4.
LABELS = [0, 1, 2, 3, 0, 1]
A = [[.6, .4, 0, 0], [0, .9, .1, 0], [0, 0, 1, 0], [.3, 0, 0, .7], [.45, .55, 0, 0], [0, 1, 0, 0]]
B = [[.6, .4, 0, 0], [0, .2, .8, 0], [0, 0, 1, 0], [.3, 0, 0, .7], [.8, .2, 0, 0], [0, 1, 0, 0]]
C = [[0, 1, 0, 0], [0, .6, .4, 0], [0, 0, 1, 0], [1, 0, 0, 0], [.4, .6, 0, 0], [0, .2, 0, .8]]
# Top-1 hits, image by image (1 = the argmax is the label), worked out by hand:
#                 img 0  1  2  3  4  5
# A                   1  1  1  1  0  1   = 5
# B                   1  0  1  1  1  1   = 5
# C                   0  1  1  0  0  0   = 2
# mean(A, B, C)       0  1  1  0  1  1   = 4   img 4: class 0 (.45+.8+.4)/3 = .55 > .45
# mean(B, C) (no A)   0  0  1  0  1  1   = 3   img 1: class 2 (.8+.4)/2 = .6 wins
# mean(A, C) (no B)   0  1  1  0  0  1   = 3   img 5: class 1 (1+.2)/2 = .6 > .4
# mean(A, B) (no C)   1  1  1  1  1  1   = 6   img 4: class 0 (.45+.8)/2 = .625
SINGLE, ENSEMBLE, WITHOUT = [5, 5, 2], 4, [3, 3, 6]
MANIFEST = {"hash": "h", "path": "val.parquet", "num_images": 6}


def hand_probs(*teachers) -> torch.Tensor:
    return torch.tensor([A, B, C], dtype=torch.float32)[list(teachers)]


def test_leave_one_out_hits_come_from_the_same_probabilities():
    hits = hits_of_probs(hand_probs(0, 1, 2), torch.tensor(LABELS), 1)
    assert hits[:, 0].tolist() == [*SINGLE, ENSEMBLE, *WITHOUT]
    # top-4 of 4 classes: every row holds the label, so the second column counts every image of every row
    assert hits_of_probs(hand_probs(0, 1, 2), torch.tensor(LABELS), 4)[:, 1].tolist() == [6] * 7


def test_with_two_teachers_leaving_one_out_is_the_other_teacher():
    hits = hits_of_probs(hand_probs(0, 2), torch.tensor(LABELS), 1)[:, 0].tolist()
    # A, C, mean(A, C), then without A = C alone, without C = A alone
    assert hits == [5, 2, 3, 2, 5]


def test_one_teacher_has_no_leave_one_out_row():
    assert hits_of_probs(hand_probs(0), torch.tensor(LABELS), 1)[:, 0].tolist() == [5, 5]
    record = summarize_hits(["A"], [[5, 6], [5, 6]], 6, 4, MANIFEST)
    assert record["leave_one_out"] == {} and ensemble_warnings(record) == []


def record_of(*teachers):
    names = ["A", "B", "C"]
    hits = hits_of_probs(hand_probs(*teachers), torch.tensor(LABELS), 1).numpy()
    return summarize_hits([names[t] for t in teachers], hits, 6, 4, MANIFEST)


def test_the_record_holds_the_leave_one_out_and_best_teacher_figures():
    record = record_of(0, 1, 2)
    assert {n: r["top1"] for n, r in record["teachers"].items()} == pytest.approx({"A": 500 / 6, "B": 500 / 6, "C": 200 / 6})
    assert record["ensemble"]["top1"] == pytest.approx(400 / 6)
    assert {n: r["top1"] for n, r in record["leave_one_out"].items()} == pytest.approx({"A": 50.0, "B": 50.0, "C": 100.0})
    assert record["best_teacher"] == {"name": "A", "top1": pytest.approx(500 / 6)}  # the first of equals
    json.dumps(record)  # stored as a cache attribute
    table = format_eval_table(record)
    assert "ensemble without it" in table and "100.00%" in table.splitlines()[3]  # C's row: without C
    assert "ensemble margin over the best single teacher (A): -16.67 points" in table


def test_a_teacher_that_lowers_the_ensemble_is_named_with_the_figures():
    warnings = ensemble_warnings(record_of(0, 1, 2))
    assert warnings[0] == "teacher C lowers the ensemble: without it 100.00%, with it 66.67% top-1"
    # A and B do not: without either the ensemble falls to 50%
    assert not any(w.startswith(("teacher A", "teacher B")) for w in warnings)
    # three teachers: "C lowers it" does not say that the ensemble is below A, so that is said too
    assert len(warnings) == 2
    assert warnings[1].startswith("the ensemble (66.67% top-1) is not above its best single teacher A (83.33%)")
    assert "drop the weak teacher" in warnings[1] and "docs/teachers.md" in warnings[1]


def test_two_teachers_one_weak_get_one_warning():
    assert ensemble_warnings(record_of(0, 2)) == [
        "teacher C lowers the ensemble: without it 83.33%, with it 50.00% top-1; the student learns this "
        "ensemble: drop the weak teacher from --teachers or train it longer (docs/teachers.md)"]


def test_no_warning_when_every_teacher_helps():
    record = record_of(0, 1)  # mean(A, B) = 6/6 against 5/6 for each alone
    assert record["ensemble"]["top1"] == 100.0 and ensemble_warnings(record) == []


def test_an_ensemble_equal_to_its_best_teacher_is_not_above_it():
    record = summarize_hits(["A", "B"], [[5, 6], [3, 6], [5, 6], [3, 6], [5, 6]], 6, 4, MANIFEST)
    assert ensemble_warnings(record)[0].startswith("the ensemble (83.33% top-1) is not above its best single "
                                                   "teacher A (83.33%)")


def test_records_from_before_leave_one_out_have_no_warnings():
    old = {"teachers": {"A": {"top1": .9, "top5": 1}, "B": {"top1": .5, "top5": 1}}, "ensemble": {"top1": .6, "top5": 1}}
    assert ensemble_warnings(old) == []


def constant_teacher(name: str, bias: list[float], path) -> str:
    """Weights whose logits are ``bias`` whatever the image: a zero classifier with that bias."""
    model = timm.create_model(name, num_classes=len(bias))
    head = model.get_classifier()
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor(bias))
    torch.save(model.state_dict(), path)
    return f"{name}={path}"


def cli(*args: str):
    return CliRunner().invoke(main, ["--set", "runtime.progress=false", "--set", "runtime.device=cpu", *args])


def test_teacher_cache_warns_and_cache_info_shows_the_figures(tmp_path):
    # 7 images dealt round-robin over ant, bee, cat: 3 ants, 2 bees, 2 cats
    train = make_manifest(tmp_path, "train", sizes=SIZES[:4])
    val = make_manifest(tmp_path, "val", sizes=SIZES[:7], seed=1)
    # test_resnet always says ant (softmax of (2, 0, 0): .79), top-1 3/7; test_efficientnet always says cat,
    # surer (softmax of (0, 0, 5): .99), top-1 2/7. Their mean says cat: ant (.787 + .007) / 2 = .40,
    # cat (.106 + .987) / 2 = .55. So the ensemble scores 2/7, and without test_efficientnet 3/7.
    weights = [constant_teacher("test_resnet", [2, 0, 0], tmp_path / "ant.pt"),
               constant_teacher("test_efficientnet", [0, 0, 5], tmp_path / "cat.pt")]
    cache = tmp_path / "cache"
    result = cli("--set", "teacher_cache.min_top1_over_chance=0",  # the weak teacher is below chance (1/3)
                 "teacher-cache", "--teachers", "test_resnet,test_efficientnet", "--teacher-weights", weights[0],
                 "--teacher-weights", weights[1], "--input-size", "test_resnet=32", "--input-size",
                 "test_efficientnet=32", "--manifest", str(train), "--out", str(cache), "--num-crops", "1",
                 "--loader", "torch", "--evaluate-teachers", str(val))
    assert result.exit_code == 0, result.output
    warning = "teacher test_efficientnet lowers the ensemble: without it 42.86%, with it 28.57% top-1"
    assert f"warning: {warning}" in result.stderr
    assert "not above its best single teacher" not in result.stderr  # two teachers: said once
    assert "ensemble margin over the best single teacher (test_resnet): -14.29 points" in result.stdout

    shown = cli("cache", "info", str(cache))
    assert shown.exit_code == 0, shown.output
    lines = shown.stdout.splitlines()
    resnet = next(i for i, line in enumerate(lines) if line.startswith("  test_resnet "))
    assert "val top-1 42.86% top-5 100.00%; ensemble without it top-1 28.57%" in lines[resnet + 1]
    assert "val top-1 28.57% top-5 100.00%; ensemble without it top-1 42.86%" in lines[resnet + 3]
    assert "val top-1 28.57% top-5 100.00%, -14.29 points over the best single teacher test_resnet (42.86%)" \
        in shown.stdout
    assert f"warning       {warning}" in shown.stdout

    info = json.loads(cli("cache", "info", str(cache), "--json").stdout)
    by_name = {t["name"]: t for t in info["teachers"]}
    assert by_name["test_resnet"]["ensemble_without"]["top1"] == pytest.approx(200 / 7)
    assert by_name["test_efficientnet"]["ensemble_without"]["top1"] == pytest.approx(300 / 7)
    assert info["best_teacher_eval"] == {"name": "test_resnet", "top1": pytest.approx(300 / 7)}
    assert info["ensemble_warnings"][0].startswith(warning)


def test_hits_of_rank_shares_sum_to_the_hits_of_all_images():
    """Under torchrun each rank counts a strided share and the counts are summed (evaluate_teachers):
    the leave-one-out rows must add up like the others."""
    probs, labels = hand_probs(0, 1, 2), torch.tensor(LABELS)
    shares = [hits_of_probs(probs[:, r::2], labels[r::2], 2) for r in range(2)]
    assert torch.equal(shares[0] + shares[1], hits_of_probs(probs, labels, 2))
    assert shares[0][:, 0].tolist() != shares[1][:, 0].tolist()  # the shares do differ


def test_a_student_is_told_when_it_has_caught_up_with_its_teachers():
    record = {"unit": "percent", "ensemble": {"top1": 87.24, "top5": 99.0}, "manifest": {"num_images": 10000}}
    note = student_caught_up(87.17, record)  # the study's cached C = 1 run: 0.07 points under its ensemble
    assert note.startswith("the student (87.17% top-1) has caught up with its teachers' ensemble (87.24% on the "
                           "same 10000 images, from --evaluate-teachers)")
    assert "if that run scores near or above 87.24%, train stronger teachers" in note
    assert student_caught_up(89.0, record) is not None  # above its teachers
    assert student_caught_up(86.75, record) is not None  # 0.49 points under: within CAUGHT_UP_POINTS
    assert student_caught_up(86.70, record) is None  # 0.54 points under: there is still something to learn
    assert student_caught_up(99.0, None) is None  # a cache built without --evaluate-teachers


def test_distill_notes_a_student_at_or_above_the_ensemble_it_was_scored_against(tmp_path, capsys):
    train = make_manifest(tmp_path, "train", sizes=SIZES[:4])
    val = make_manifest(tmp_path, "val", sizes=SIZES[:3], seed=1)
    other_val = make_manifest(tmp_path, "other", sizes=SIZES[3:6], seed=2)
    cache = tmp_path / "cache"
    built = cli("--set", "teacher_cache.min_top1_over_chance=0", "teacher-cache", "--teachers", "test_resnet",
                "--input-size", "test_resnet=32", "--no-pretrained", "--manifest", str(train), "--out", str(cache),
                "--num-crops", "1", "--loader", "torch", "--evaluate-teachers", str(val))
    assert built.exit_code == 0, built.output
    stored = CacheReader(str(cache)).attrs["teacher_eval"]

    def job(val_manifest, out):
        return setup(load_config(None, {
            "runtime.device": "cpu", "runtime.progress": False, "runtime.num_workers": 0,
            "data.manifest": str(train), "data.val_manifest": str(val_manifest), "distill.cache": str(cache),
            "distill.student": "test_resnet", "distill.out": str(tmp_path / out), "optim.epochs": 1,
            "optim.batch_size": 4, "optim.img_size": 32, "optim.loader": "torch"}))

    # the teachers' scores reach the run only when they were measured on the run's own validation images
    scored = job(val, "scored")
    assert scored.teacher_eval == stored
    unscored = job(other_val, "unscored")
    assert unscored.teacher_eval is None
    assert fit(unscored)["teacher_note"] is None

    # fit's note, both ways: an ensemble at 0% top-1 is below any student, one above 100% above every student
    scored.teacher_eval = {**stored, "ensemble": {"top1": 0.0, "top5": 0.0}}
    capsys.readouterr()
    result = fit(scored)
    assert result["teacher_note"] == student_caught_up(result["best_top1"], scored.teacher_eval)
    assert result["teacher_note"].startswith(f"the student ({result['best_top1']:.2f}% top-1) has caught up "
                                             "with its teachers' ensemble (0.00% on the same 3 images")
    assert f"note: {result['teacher_note']}" in capsys.readouterr().err
    again = job(val, "above")
    capsys.readouterr()  # setup's own advice (no --hard-label-top1 given) is not fit's note
    again.teacher_eval = {**stored, "ensemble": {"top1": 101.0, "top5": 100.0}}
    assert fit(again)["teacher_note"] is None and "note:" not in capsys.readouterr().err
