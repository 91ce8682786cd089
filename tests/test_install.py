"""A non-editable install works without the checkout: wheel -> install -> `pipeline` from elsewhere.

The wheel is built from a copy of the tracked sources (no build isolation, no
dependencies: the test venv already has them) and installed with ``--target``
into a temporary directory. Every command then runs from another temporary
directory with only that install on ``PYTHONPATH``, and the test checks that
``common`` was imported from the install and not from this checkout, that the
default config inside the wheel is a real file equal to the top-level
pipeline.toml (the checkout's ``common/pipeline.toml`` is a symlink to it),
and that a real command works: a manifest built, then one epoch trained.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "pipeline.toml", "recipes", "common", "data_manifests",
           "stage1_teacher_cache", "stage2_student_distill")  # fmt: skip


def _run(cmd, cwd, env, timeout=120) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    try:  # --no-build-isolation builds with this venv's setuptools, which needs bdist_wheel (>= 70.1)
        from setuptools.command import bdist_wheel  # noqa: F401
    except ImportError:
        pytest.skip("needs setuptools >= 70.1 in this venv to build the wheel (pip install -e '.[test]')")
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, src / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "wheel"), str(src)], tmp, env)
    (wheel,) = (tmp / "wheel").glob("*.whl")
    target = tmp / "site"
    _run([*pip, "install", "--no-deps", "--no-compile", "--target", str(target), str(wheel)], tmp, env)
    work = tmp / "elsewhere"
    work.mkdir()
    return {"target": target, "work": work, "env": {**env, "PYTHONPATH": str(target)}}


def test_installed_package_runs_without_the_checkout(installed, tmp_path):
    target, work, env = installed["target"], installed["work"], installed["env"]
    probe = (
        "import json, common, common.config as c, data_manifests, stage1_teacher_cache, stage2_student_distill\n"
        "print(json.dumps({'files': [m.__file__ for m in (common, data_manifests, stage1_teacher_cache,"
        " stage2_student_distill)], 'config': str(c.DEFAULT_CONFIG_PATH),"
        " 'symlink': c.DEFAULT_CONFIG_PATH.is_symlink(), 'defaults': c.load_config() == c.Config()}))"
    )
    info = json.loads(_run([sys.executable, "-c", probe], work, env))
    for file in info["files"]:
        assert Path(file).is_relative_to(target), f"{file} imported from outside the install"
    config = Path(info["config"])
    assert config.is_relative_to(target) and not info["symlink"]
    assert config.read_text() == (REPO / "pipeline.toml").read_text()
    assert info["defaults"]

    pipeline = str(target / "bin" / "pipeline")  # the console script of the wheel's entry point
    assert "MEAL V2 distillation" in _run([pipeline, "--help"], work, env)
    # The recipes ship too (common/recipe_files links to recipes/): listed, and one resolves.
    listed = [line.split()[0] for line in _run([pipeline, "recipes"], work, env).splitlines() if line.strip()]
    assert listed == sorted(p.stem for p in (REPO / "recipes").glob("*.toml"))
    shown = _run([pipeline, "--recipe", "mealv2_resnet50_224", "config", "show", "distill"], work, env)
    assert 'teachers = ["senet154.gluon_in1k", "resnet152s.gluon_in1k"]' in shown

    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (work / "tree" / cls).mkdir(parents=True, exist_ok=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(work / "tree" / cls / f"{i}.png")
    _run([pipeline, "manifest", "build", "tree", "--out", "m.parquet", "--no-progress"], work, env)
    _run([pipeline, "--set", "runtime.num_workers=0", "train", "--model", "test_resnet", "--manifest", "m.parquet",
          "--val-manifest", "m.parquet", "--out", "run", "--epochs", "1", "--batch-size", "3", "--img-size", "16",
          "--loader", "torch", "--device", "cpu", "--no-progress"], work, env)  # fmt: skip
    (record,) = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    assert record["epoch"] == 1 and 0 <= record["val_top1"] <= 100
    assert json.loads((work / "run" / "config.json").read_text())["optim"]["momentum"] == 0.9  # packaged default
