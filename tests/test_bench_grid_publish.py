"""The accuracy grid's last stretch (benchmarks/bench_distill_regimes.py main): after the steps, the JSON, the
report, the plot and both marked sections of the documents, without training (the steps' records are synthetic)."""
from __future__ import annotations

import json
from pathlib import Path

from benchmarks import bench_distill_regimes as grid
from benchmarks.bench_distill_regimes import Regime, TeacherSpec
from test_distill_regimes import synthetic_done


def test_main_writes_the_json_report_and_both_doc_sections(tmp_path: Path, monkeypatch, capsys):
    t = TeacherSpec("test_resnet", 1, 100)
    regimes = [Regime(n, 100, (t,), 4) for n in "abcd"] + [Regime(n, 100, (t,), 4, held_out=True)
                                                           for n in ("h1", "h2")]
    monkeypatch.setattr(grid, "smoke_grid", lambda: regimes)
    monkeypatch.setattr(grid.Grid, "all", lambda self: synthetic_done(regimes))
    docs = tmp_path / "docs"
    docs.mkdir()
    out = tmp_path / "grid.json"
    assert grid.main(["--smoke", "--workdir", str(tmp_path / "wd"), "--doc", str(docs / "results.md"),
                      "--out", str(out)]) == 0

    printed = capsys.readouterr().out
    assert f"JSON: {out}\n" in printed  # the JSON's path, not the last document's
    assert json.loads(out.read_text())["analysis"]["rule"] == "distil when margin > 2.50"
    results, teachers = (docs / "results.md").read_text(), (docs / "teachers.md").read_text()
    assert "<!-- bench_distill_regimes:begin" in results and "### Distillation regimes" in results
    assert "<!-- bench_distill_regimes[margins]:begin" in teachers and "Rule: **distil when margin > 2.50**" in teachers
    assert (tmp_path / "wd" / "distill_regimes.png").stat().st_size > 0
