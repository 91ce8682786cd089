"""One renderer (issue 24, item 2): one decode per image for every view a step needs, one frame check,
each stage-1 shard's boxes drawn once.

Decodes and box draws are counted by wrapping the real functions; expected counts come from the
plan (the images an epoch visits, the shards of the manifest), not from a first run.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from common import loader_kind, render
from common.images import ImageError
from common.loader_kind import dali_available
from common.manifest import load_manifest
from common.render import TorchRenderer, View, decode, render_crops
from stage1_teacher_cache import run as stage1_run
from stage2_student_distill.train import setup
from tests.stage1_fixtures import config, dataset  # noqa: F401  (fixture)
from tests.test_online import TEACHER_SIZE, data, online_config  # noqa: F401  (fixture)

needs_dali = pytest.mark.skipif(not dali_available(), reason="nvidia-dali not installed")


def counting_decode(monkeypatch) -> list:
    decoded = []
    real = render.decode
    monkeypatch.setattr(render, "decode", lambda path: decoded.append(str(path)) or real(path))
    return decoded


@pytest.mark.parametrize("m", [1, 2])
def test_an_online_torch_epoch_decodes_each_image_once_for_the_student_and_every_teacher(data, tmp_path,  # noqa: F811
                                                                                         monkeypatch, m):
    job = setup(online_config(data, tmp_path / "run", **{
        "distill.crops_per_image": m, "runtime.num_workers": 2,
        "teacher_cache.teachers": ["test_resnet", "test_byobnet"],
        "teacher_cache.input_sizes": [f"test_resnet={TEACHER_SIZE}", "test_byobnet=40"]}))
    manifest = load_manifest(str(data["train"]))
    decoded = counting_decode(monkeypatch)
    visited = []
    for batch in job.train_loader.epoch(0):
        ids = batch.image_ids.numpy()
        visited.extend(ids[::m].tolist())  # an image's m crops are adjacent
        assert [tuple(v.shape) for v in batch.views] == [(len(ids), 3, TEACHER_SIZE, TEACHER_SIZE),
                                                         (len(ids), 3, 40, 40)]
        # each teacher's view is common.render of the batch's box at that teacher's size and interpolation
        for view, teacher in zip(batch.views, job.targets.teachers):
            image = decode(manifest.abspath(int(ids[-1])))
            want = render_crops(image, batch.boxes[-1:], batch.flips[-1:], teacher.preprocess.input_size,
                                teacher.preprocess.interpolation)
            assert torch.equal(view[-1:], want)
    assert sorted(visited) == list(range(12))
    # one decode per image visited (was 2: the student's, then the teachers'); none per crop or per view
    assert sorted(decoded) == sorted(str(manifest.abspath(i)) for i in visited)


def test_stage1_draws_each_shards_boxes_once(dataset, tmp_path, monkeypatch):  # noqa: F811
    drawn = []
    real = stage1_run.shard_boxes
    monkeypatch.setattr(stage1_run, "shard_boxes",
                        lambda crops, manifest, start, stop, first_crop=0: drawn.append((start, stop))
                        or real(crops, manifest, start, stop, first_crop))
    summary = stage1_run.run(config(dataset["train"], tmp_path / "cache"))
    num_images = load_manifest(dataset["train"]).num_images  # 9 images, shards of 4
    assert summary["shards_written"] == 3
    assert drawn == [(start, min(start + 4, num_images)) for start in range(0, num_images, 4)]


def _images(tmp_path) -> list[str]:
    rng = np.random.default_rng(3)
    paths = []
    for i, (w, h) in enumerate([(41, 33), (30, 52)]):
        path = tmp_path / f"im{i}.jpg"
        gradient = np.linspace(0, 200, w, dtype=np.float64)[None, :, None]
        pixels = np.clip(rng.integers(0, 56, (h, w, 3)) + gradient, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(path, quality=85)
        paths.append(str(path))
    return paths


BOXES = np.array([[[1, 2, 30, 25], [5, 0, 36, 33]], [[0, 4, 29, 40], [3, 10, 20, 20]]], np.int32)  # [n, m, 4]
OTHER_BOXES = np.array([[[0, 0, 20, 20], [10, 5, 31, 28]], [[2, 2, 26, 26], [0, 20, 30, 32]]], np.int32)
FLIPS = np.array([[0, 1], [1, 0]], np.uint8)
VIEWS = [View(16, "bilinear"), View(24, "bicubic")]


@needs_dali
@pytest.mark.parametrize("m", [1, 2])
def test_dali_renders_every_view_from_one_decode_as_its_single_view_renderer_does(tmp_path, m):
    """Several views share one full decode; each view's pixels equal that view rendered alone (whose
    m = 1 path decodes only the box) and stay close to the torch renderer's."""
    from common.dali_crops import DaliCropRenderer

    paths = _images(tmp_path)
    boxes, flips = [BOXES[:, :m], OTHER_BOXES[:, :m]], FLIPS[:, :m]  # each view its own boxes
    both = DaliCropRenderer(VIEWS, batch_size=2, num_threads=1, crops_per_image=m)(paths, boxes, flips)
    torch_views = TorchRenderer(VIEWS)(paths, boxes, flips)
    for v, (view, view_boxes) in enumerate(zip(VIEWS, boxes)):
        (alone,) = DaliCropRenderer([view], batch_size=2, num_threads=1, crops_per_image=m)(paths, [view_boxes], flips)
        assert both[v].shape == (2 * m, 3, view.size, view.size) and torch.equal(both[v], alone)
        assert (both[v].float() - torch_views[v].float()).abs().mean() < 1.5  # tests/test_loaders.py's tolerance


@pytest.mark.parametrize("kind", ["torch", pytest.param("dali", marks=needs_dali)])
def test_both_renderers_refuse_a_frame_other_than_the_manifests_by_file(tmp_path, kind):
    from common.config import RuntimeConfig
    from common.runtime import build_runtime

    paths = _images(tmp_path)
    renderer = loader_kind.build_renderer(kind, VIEWS, build_runtime(RuntimeConfig(device="cpu")), 2, 2)
    frames = np.array([[41, 33], [30, 52]])
    assert [tuple(v.shape) for v in renderer(paths, [BOXES, BOXES], FLIPS, frames)] == [(4, 3, 16, 16), (4, 3, 24, 24)]
    frames[1] = [52, 30]  # as if the second file had been replaced by a rotated copy
    with pytest.raises(ImageError, match=r"decoded as 30x52 \(after EXIF orientation\) but the manifest says 52x30; "
                                         "the file changed since the manifest was built") as err:
        renderer(paths, [BOXES, BOXES], FLIPS, frames)
    assert str(err.value).startswith(f"{paths[1]}: ")
