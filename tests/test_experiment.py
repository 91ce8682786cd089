"""The experiment driver (stage2_student_distill/experiment.py) and what its callers read through it.

* ``teacher_top1`` reads the ``teacher_eval`` record stage 1 writes: checked on a real cache built with
  --evaluate-teachers from teachers whose predictions are fixed by construction (expected values by hand);
* the benchmarks' reports are pure functions of their results JSON: each committed
  benchmarks/results/*.json gives the table the code before the driver produced (saved under
  tests/experiment_reports/, computed with that code);
* `teacher-cache --more-crops N` takes C from the cache; an explicit --num-crops that disagrees is refused.

The driver's steps end to end (data, teachers, cache, students, table, plot, resume) run in tests/test_demo.py.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from stage2_student_distill.app.cli import main
from stage1_fixtures import SIZES, dataset, make_manifest  # noqa: F401
from stage2_student_distill import experiment as ex
from test_grow import arrays, assert_same_cache, caches, cli_args  # noqa: F401
from test_teacher_eval import constant_teacher

REPO = Path(__file__).resolve().parents[1]
REPORTS = Path(__file__).parent / "experiment_reports"


# --------------------------------------------------------------------------- teacher_top1 on a real cache


def test_teacher_top1_reads_each_teacher_and_the_ensemble_from_a_real_cache(tmp_path):
    # 7 validation images dealt round-robin over ant, bee, cat: 3 ants, 2 bees, 2 cats. Each teacher's
    # logits are its classifier bias whatever the image, so its top-1 is the share of its class.
    val = make_manifest(tmp_path, "val", sizes=SIZES[:7], seed=1)
    train = make_manifest(tmp_path, "train", sizes=SIZES[:4])
    biases = {"test_resnet": [2.0, 0.0, 0.0], "test_efficientnet": [0.0, 3.0, 0.0]}  # says ant; says bee
    weights = [constant_teacher(name, bias, tmp_path / f"{name}.pt") for name, bias in biases.items()]
    cache = tmp_path / "cache"
    args = ["--set", "runtime.progress=false", "--set", "runtime.device=cpu",
            "--set", "teacher_cache.min_top1_over_chance=0",  # constant teachers are at chance or below
            "teacher-cache", "--teachers", ",".join(biases), "--manifest", str(train), "--out", str(cache),
            "--num-crops", "1", "--loader", "torch", "--evaluate-teachers", str(val)]
    for name, w in zip(biases, weights):
        args += ["--teacher-weights", w, "--input-size", f"{name}=32"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output

    counts = np.array([3, 2, 2])  # images per class (ant, bee, cat)
    softmax = {n: np.exp(b) / np.exp(b).sum() for n, b in biases.items()}
    # bee: (.107 + .909) / 2 > ant's (.787 + .045) / 2
    ensemble_class = int(np.argmax(np.mean(list(softmax.values()), axis=0)))
    read = ex.teacher_top1(ex.cache_evaluation(cache))
    assert read.teachers == pytest.approx({"test_resnet": 100 * 3 / 7, "test_efficientnet": 100 * 2 / 7})
    assert read.ensemble == pytest.approx(100 * counts[ensemble_class] / 7)
    assert ex.teacher_top1(None) == ex.TeacherTop1({}, None)  # a cache built without --evaluate-teachers


# --------------------------------------------------------------------------- the reports of committed results


def _fashion_report():
    from benchmarks.bench_fashion_mnist import report

    return report


def _crop_report():
    from benchmarks.bench_crop_budget import report

    return report


def _without_plot_link(text: str) -> str:
    # bench_crop_budget links its plot relative to the docs file resolved against the working directory,
    # and the committed crop_budget.json names the plot by an absolute path of the machine that ran it
    return re.sub(r"!\[top-1 against C\]\((?:[^)]*/)?([^/)]+)\)", r"![top-1 against C](\1)", text)


@pytest.mark.parametrize("name, report", [
    ("fashion_mnist", _fashion_report), ("fashion_mnist_2k_students", _fashion_report),
    ("fashion_mnist_60k_students", _fashion_report), ("crop_budget", _crop_report),
    ("crop_budget_e12", _crop_report),
])
def test_a_committed_results_json_gives_the_table_it_gave_before(name, report, monkeypatch):
    monkeypatch.chdir(REPO)
    payload = json.loads((REPO / "benchmarks/results" / f"{name}.json").read_text())
    expected = (REPORTS / f"{name}.md").read_text()
    assert _without_plot_link(report()(payload)) == _without_plot_link(expected)


def test_the_saved_tables_are_the_ones_in_docs_results():
    """The fixtures are the committed tables where docs/results.md holds them (the 2k-students run's went to /tmp)."""
    doc = (REPO / "docs/results.md").read_text()
    sections = dict(re.findall(r"<!-- (\S+):begin[^\n]*-->\n(.*?)<!-- \1:end -->", doc, re.S))
    for name, section in {"fashion_mnist": "bench_fashion_mnist", "fashion_mnist_60k_students":
                          "bench_fashion_mnist[full-data]", "crop_budget": "bench_crop_budget",
                          "crop_budget_e12": "bench_crop_budget[e12]"}.items():
        assert _without_plot_link((REPORTS / f"{name}.md").read_text()) == _without_plot_link(sections[section]), name


# --------------------------------------------------------------------------- --more-crops without --num-crops


def test_more_crops_takes_c_from_the_cache(dataset, caches, tmp_path):  # noqa: F811
    # pipeline.toml's crops.num_crops is 8: the 2-crop cache grows to 4 only if C comes from the cache
    cache = shutil.copytree(caches["small"], tmp_path / "cache")
    result = CliRunner().invoke(main, cli_args(cache, dataset["train"], "--more-crops", "2"))
    assert result.exit_code == 0, result.output
    assert "grown from 2 to 4 crops per image" in result.output
    assert_same_cache(cache, caches["scratch"])


def test_more_crops_resumes_an_unfinished_growth_without_num_crops(dataset, caches, tmp_path, monkeypatch):  # noqa: F811
    from common.cache_format import CacheError, CacheReader
    from stage1_teacher_cache import grow

    cache = shutil.copytree(caches["small"], tmp_path / "cache")

    def killed(path):
        raise CacheError("killed before the swap")

    with monkeypatch.context() as patch:  # every staging shard written, the arrays not swapped in yet
        patch.setattr(grow, "swap_in", killed)
        stopped = CliRunner().invoke(main, cli_args(cache, dataset["train"], "--more-crops", "2"))
    assert stopped.exit_code == 1 and "killed before the swap" in stopped.output
    with pytest.raises(CacheError, match="being grown from 2 to 4"):
        CacheReader(cache)
    again = CliRunner().invoke(main, cli_args(cache, dataset["train"], "--more-crops", "2"))
    assert again.exit_code == 0, again.output
    assert_same_cache(cache, caches["scratch"])


def test_more_crops_with_a_num_crops_the_cache_does_not_have_is_refused(dataset, caches, tmp_path):  # noqa: F811
    cache = shutil.copytree(caches["small"], tmp_path / "cache")
    result = CliRunner().invoke(main, cli_args(cache, dataset["train"], "--num-crops", "3", "--more-crops", "1"))
    assert result.exit_code == 1
    # one line besides stage 1's warnings about the random-weight teachers
    said = [line for line in result.output.strip().splitlines() if not line.startswith("warning: ")]
    assert "Traceback" not in result.output and len(said) == 1, result.output
    assert "has 2 crops per image, but this run's crops.num_crops is 3" in result.output
    assert "pass --num-crops 2" in result.output
    assert all(np.array_equal(a, b) for a, b in zip(arrays(cache).values(), arrays(caches["small"]).values()))


@pytest.mark.parametrize("crops", [[2], {"num_crops": "2"}, None], ids=["list", "string", "absent"])
def test_more_crops_on_a_cache_without_a_whole_crop_count_is_refused_in_one_line(dataset, caches, tmp_path,  # noqa: F811
                                                                                 crops):
    cache = shutil.copytree(caches["small"], tmp_path / "cache")
    meta = json.loads((cache / "zarr.json").read_text())
    if crops is None:
        del meta["attributes"]["crops"]
    else:
        meta["attributes"]["crops"] = crops if isinstance(crops, list) else {**meta["attributes"]["crops"], **crops}
    (cache / "zarr.json").write_text(json.dumps(meta))
    result = CliRunner().invoke(main, cli_args(cache, dataset["train"], "--more-crops", "1"))
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    said = [line for line in result.output.strip().splitlines() if not line.startswith("warning: ")]
    assert len(said) == 1 and "attributes record no whole-number crop count (crops.num_crops)" in said[0], result.output
    assert not (cache / "grow").exists()
