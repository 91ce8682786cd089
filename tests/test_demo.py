"""`pipeline demo` end to end on tiny synthetic Fashion-MNIST files (the recipe test).

The real dataset is not needed: IDX files with 28 x 28 class-coded pictures
(a bright bar whose position is the class, plus noise) are learnable in one
epoch by the tiny models, so the teacher check passes and every step runs for
real through the CLI: data, manifests, two teachers, the cache, both students,
the table, results.json and the plot, and a rerun resumes instead of redoing.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from stage2_student_distill.app.cli import main as cli_main

CLASSES = 10


def _idx(array: np.ndarray) -> bytes:
    header = (0x0800 | array.ndim).to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def class_coded(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) * 7 % CLASSES).astype(np.uint8)
    images = rng.integers(0, 60, size=(n, 28, 28)).astype(np.uint8)
    for i, y in enumerate(labels):
        images[i, 2 + 2 * y : 4 + 2 * y, 4:24] = 250  # a bar at a class-specific height
    return images, labels


def write_fashion_mnist(source: Path, n_train: int, n_test: int) -> None:
    source.mkdir(parents=True, exist_ok=True)
    for prefix, (images, labels) in {"train": class_coded(n_train, 0), "t10k": class_coded(n_test, 1)}.items():
        (source / f"{prefix}-images-idx3-ubyte").write_bytes(_idx(images))
        (source / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx(labels))


def test_demo_runs_every_step_and_resumes(tmp_path):
    write_fashion_mnist(tmp_path / "src", n_train=300, n_test=60)
    out = tmp_path / "run"
    args = [
        "--set", "runtime.progress=false", "--set", "runtime.num_workers=0",
        "--set", f"demo.source_dir={tmp_path / 'src'}", "--set", f"demo.data_dir={tmp_path / 'data'}",
        "--set", "demo.teacher_train_images=300", "--set", "demo.teacher_epochs=4",
        "--set", "demo.student_epochs=4", "--set", "optim.eval_every=2", "--set", "optim.batch_size=10",
        "--set", "crops.num_crops=2", "--set", "optim.img_size=16",
        "demo", "--out", str(out), "--train-images", "100", "--val-images", "60",
    ]  # fmt: skip
    first = CliRunner().invoke(cli_main, args)
    assert first.exit_code == 0, first.output + repr(first.exception)

    result = json.loads((out / "results.json").read_text())
    names = [r["model"] for r in result["rows"]]
    assert names == [
        "teacher test_resnet (300 training images)", "teacher test_byobnet (300 training images)",
        "teacher ensemble (mean softmax)",
        "student test_efficientnet, MEAL V2 (cached KD)", "student test_efficientnet, hard labels",
        "student test_efficientnet, hard labels, short run (the advice's figure)",
    ]  # fmt: skip
    assert [r["epochs"] for r in result["rows"]][-1] == 1  # a quarter of 4 epochs
    # Chance is 10%; a guessing model reaches 40% of the 60 test images with probability 1e-9
    # (binomial). So the margins fail when a step is broken, not by bad luck: with the cached
    # targets shifted by one sample in each batch, the MEAL V2 student stays near chance.
    top1 = {r["model"]: r["top1"] for r in result["rows"]}
    assert all(a is not None and 0 <= a <= 100 for a in top1.values())
    # The same bound for the teachers: test_byobnet scores 58.3% on an Intel Xeon machine, below the 60% once
    # set from runs on AMD EPYC (the kernels' float order differs), so a bound from one machine's run is fragile.
    assert all(a >= 40 for m, a in top1.items() if "short run" not in m), top1  # the short run has 1 epoch
    assert result["mealv2_minus_hard"] == (
        top1["student test_efficientnet, MEAL V2 (cached KD)"] - top1["student test_efficientnet, hard labels"]
    )
    assert "| teacher ensemble (mean softmax) |" in first.output and "MEAL V2 - hard labels:" in first.output
    assert (out / "results.md").read_text().startswith("| model | val top-1 (%) | epochs |")
    assert (out / "val_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the students validated on epochs 2 and 4 only (eval_every = 2); the teachers on their last epoch
    student_metrics = (out / "student_hard/metrics.jsonl").read_text().splitlines()
    assert ["val_top1" in json.loads(line) for line in student_metrics] == [False, True] * 2
    # the students' 100 images and the teachers' 300 are separate trees; the test split has its own
    data = tmp_path / "data"
    assert {p.name for p in data.iterdir()} == {"train-100", "train-300", "test-60"}
    assert result["config"]["demo"]["train_images"] == 100

    # a rerun finds every step complete: same numbers, nothing retrained
    before = {p: p.stat().st_mtime_ns for p in out.rglob("last.pt")}
    second = CliRunner().invoke(cli_main, args)
    assert second.exit_code == 0, second.output + repr(second.exception)
    assert json.loads((out / "results.json").read_text())["rows"] == result["rows"]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("last.pt")} == before
