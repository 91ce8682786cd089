"""Online MEAL V2 (`pipeline distill --online`): teachers in the loop, on fresh or replayed crops.

Same tiny data as tests/test_distill.py (a dozen 32x32 images, 3 classes);
random-init, seeded ``test_resnet`` / ``test_byobnet`` teachers, so a resumed
run rebuilds the same teachers.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from stage2_student_distill.app.cli import main
from common.config import load_config
from common.crops import boxes as crop_boxes
from common.manifest import load_manifest
from common.render import decode, render_crops
from stage2_student_distill.metrics import read_metrics
from stage2_student_distill.train import setup
from tests.test_distill import build_data, invoke

TEACHER_SIZE = 24  # not the student's 32: each teacher sees the crop at its own size
TIMES = ("img_per_s", "time_s", "teacher_s", "student_s")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    # k = 3 = every class: the cache keeps the whole mean softmax, rounded to float16
    return build_data(tmp_path_factory.mktemp("online"), teacher_size=TEACHER_SIZE, topk=3)


def online_args(data, out: Path, *extra: str) -> list[str]:
    return ["--set", "runtime.device=cpu", "--set", "runtime.num_workers=1", "--set", "runtime.seed=0",
            "distill", "--online", "--teachers", "test_resnet,test_byobnet",
            "--teacher-input-size", f"test_resnet={TEACHER_SIZE}", "--no-teacher-pretrained",
            "--student", "test_resnet", "--manifest", str(data["train"]), "--val-manifest", str(data["val"]),
            "--out", str(out), "--epochs", "2", "--batch-size", "4", "--eval-batch-size", "8", "--img-size", "32",
            "--loader", "torch", "--log-every", "2", "--no-progress", "--lr", "0.05", "--cutmix-prob", "0.5", *extra]


def online_config(data, out: Path, **extra):
    return load_config(None, {
        "runtime.device": "cpu", "runtime.progress": False, "runtime.num_workers": 1, "runtime.seed": 3,
        "data.manifest": str(data["train"]), "data.val_manifest": str(data["val"]),
        "optim.batch_size": 4, "optim.img_size": 32, "optim.loader": "torch",
        "distill.student": "test_resnet", "distill.out": str(out), "distill.online": True,
        "teacher_cache.teachers": ["test_resnet"], "teacher_cache.input_sizes": [f"test_resnet={TEACHER_SIZE}"],
        "teacher_cache.pretrained": False, "crops.seed": 5, "crops.scale": [0.3, 1.0], **extra,
    })


def without_times(records):
    return [{k: v for k, v in r.items() if k not in TIMES} for r in records]


def test_online_distill_runs_end_to_end_and_resumes_to_the_same_metrics(data, tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    output = invoke(*online_args(data, whole))
    assert "teacher" in output and "student" in output  # the step log splits the time
    invoke(*online_args(data, split, "--epochs", "1"))
    invoke(*online_args(data, split, "--resume"))

    expected, got = read_metrics(whole / "metrics.jsonl"), read_metrics(split / "metrics.jsonl")
    assert [r["epoch"] for r in got] == [1, 2]
    assert without_times(got) == without_times(expected)
    assert all(r["teacher_s"] > 0 and r["student_s"] > 0 for r in got)
    a, b = (torch.load(d / "last.pt", weights_only=True) for d in (whole, split))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])

    # the teachers are recorded in RUN/config.json and in the checkpoint metadata
    config = json.loads((whole / "config.json").read_text())
    assert config["distill"]["online"] is True and config["distill"]["cache"] == ""
    assert config["teacher_cache"]["teachers"] == ["test_resnet", "test_byobnet"]
    online = a["meta"]["online"]
    assert [t["timm_name"] for t in online["teachers"]] == ["test_resnet", "test_byobnet"]
    assert online["teachers"][0]["preprocess"]["input_size"] == TEACHER_SIZE
    assert online["crops"] == "fresh" and online["ensemble"]["rule"] == "mean_softmax"
    best = torch.load(whole / "best.pt", weights_only=True)
    assert best["meta"]["online"] == online


def test_resume_with_other_teachers_is_refused(data, tmp_path):
    out = tmp_path / "run"
    invoke(*online_args(data, out, "--epochs", "1"))
    args = online_args(data, out, "--resume")
    args[args.index("test_resnet,test_byobnet")] = "test_resnet"
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert "cannot resume" in result.output and "test_byobnet" in result.output


def test_online_with_a_cache_is_refused(data, tmp_path):
    result = CliRunner().invoke(main, online_args(data, tmp_path / "run", "--cache", str(data["cache"])))
    assert result.exit_code == 1 and "give one" in result.output


def test_replay_cache_without_online_is_refused(data, tmp_path):
    result = CliRunner().invoke(main, [
        "--set", "runtime.device=cpu", "distill", "--replay-cache", str(data["cache"]), "--student", "test_resnet",
        "--manifest", str(data["train"]), "--val-manifest", str(data["val"]), "--out", str(tmp_path / "run")])
    assert result.exit_code == 1 and "needs --online" in result.output


def test_fresh_online_crops_of_epoch_e_are_the_seeded_boxes_e_times_m_plus_j(data, tmp_path):
    m = 2
    # two workers: the teachers' views of a batch are rendered in chunks, then joined in order
    job = setup(online_config(data, tmp_path / "run", **{"distill.crops_per_image": m, "runtime.num_workers": 2}))
    manifest = load_manifest(str(data["train"]))
    c = job.cfg.crops
    teacher = job.targets.teachers[0]
    for epoch in (0, 1):
        seen = []
        for batch in job.train_loader.epoch(epoch):
            ids = batch.image_ids.numpy()
            j = np.tile(np.arange(m), len(ids) // m)
            assert np.array_equal(batch.crop_ids.numpy(), epoch * m + j)
            expected = crop_boxes(c.seed, ids, epoch * m + j, manifest.widths[ids], manifest.heights[ids],
                                  scale=c.scale, ratio=c.ratio, flip_p=c.flip_p)
            assert np.array_equal(batch.boxes, expected.as_array())
            assert np.array_equal(batch.flips, expected.flip)
            # the teacher's view: the same box rendered at the teacher's size and interpolation
            (view,) = batch.views
            assert view.shape == (len(ids), 3, TEACHER_SIZE, TEACHER_SIZE)
            i = 1
            image = decode(manifest.abspath(int(ids[i])))
            want = render_crops(image, expected.as_array()[i:i + 1], expected.flip[i:i + 1], TEACHER_SIZE,
                                teacher.preprocess.interpolation)
            assert torch.equal(view[i:i + 1], want)
            # targets: the teacher's full softmax, one row per crop, summing to 1
            targets = job.targets(batch)
            assert targets.shape == (len(ids), 3)
            torch.testing.assert_close(targets.sum(-1), torch.ones(len(ids)))
            seen.extend(ids.tolist())
        assert sorted(seen) == sorted(list(range(12)) * m)  # every image once per epoch, m crops each


def test_replayed_online_targets_equal_the_cache_within_float16(data, tmp_path):
    # The cache was made by the same seeded random teacher at the same size with k = every class.
    job = setup(online_config(data, tmp_path / "run", **{"distill.replay_cache": str(data["cache"]),
                                                           "runtime.seed": 0}))
    assert job.train_loader.mode == "distill"
    spread, batches = 0.0, 0
    for epoch in (0, 1):
        for batch in job.train_loader.epoch(epoch):
            cached, online = batch.targets, job.targets(batch)
            # float16 rounding of a probability <= 1 is at most 2^-11; the residual adds the same again
            torch.testing.assert_close(online, cached, atol=1e-3, rtol=0)
            spread = max(spread, float((online.max(0).values - online.min(0).values).max()))
            batches += 1
    assert batches == 2 * 3
    assert spread > 2e-2  # the targets differ between crops by far more than the tolerance


def test_replay_cache_runs_through_the_cli(data, tmp_path):
    out = tmp_path / "run"
    args = online_args(data, out, "--epochs", "1", "--replay-cache", str(data["cache"]))
    args[args.index("test_resnet,test_byobnet")] = "test_resnet"
    invoke(*args)
    (record,) = read_metrics(out / "metrics.jsonl")
    assert record["epoch"] == 1 and np.isfinite(record["train_kl"]) and record["teacher_s"] > 0
    online = torch.load(out / "last.pt", weights_only=True)["meta"]["online"]
    assert online["crops"] == "replayed" and online["replay_cache"] == str(data["cache"])


def test_teacher_weights_file_is_used_and_recorded(data, tmp_path):
    from common.models import file_sha256
    from stage2_student_distill.train import run_train

    teacher_run = tmp_path / "teacher"
    run_train(load_config(None, {
        "runtime.device": "cpu", "runtime.progress": False, "runtime.num_workers": 1,
        "data.manifest": str(data["train"]), "data.val_manifest": str(data["val"]), "optim.epochs": 1,
        "optim.batch_size": 4, "optim.img_size": TEACHER_SIZE, "optim.loader": "torch",
        "train.model": "test_byobnet", "train.out": str(teacher_run)}))
    weights = teacher_run / "best.pt"
    out = tmp_path / "run"
    args = online_args(data, out, "--epochs", "1", "--teacher-weights", f"test_byobnet={weights}")
    args[args.index("test_resnet,test_byobnet")] = "test_byobnet"
    i = args.index("--teacher-input-size")
    del args[i:i + 2]
    invoke(*args)
    (teacher,) = torch.load(out / "last.pt", weights_only=True)["meta"]["online"]["teachers"]
    assert teacher["weights"] == "file" and teacher["weights_sha256"] == file_sha256(str(weights))
    assert teacher["preprocess"]["input_size"] == TEACHER_SIZE  # from the checkpoint's own metadata
    config = json.loads((out / "config.json").read_text())
    assert config["teacher_cache"]["teacher_weights"] == [f"test_byobnet={weights}"]


def test_a_cached_run_from_before_the_online_keys_still_resumes(tmp_path):
    from stage2_student_distill.checkpoint import config_differences

    current = load_config(None, {"distill.cache": "C"}).to_dict()
    old = json.loads(json.dumps(current))
    del old["distill"]["online"], old["distill"]["replay_cache"]  # a config.json written before they existed
    assert config_differences(old, current, ("distill",)) == []
    online = load_config(None, {"distill.online": True}).to_dict()
    assert config_differences(old, online, ("distill",)) == [
        "distill.cache: run has 'C', now ''", "distill.online: run has False, now True"]
