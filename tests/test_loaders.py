"""Stage 2 loaders: cached boxes replayed, targets aligned, torch and DALI agree.

Images are tiny smooth-plus-noise pictures (like photos, unlike pure noise, so
the two resamplers' small differences stay small), as PNG and JPEG, RGB,
grayscale and RGBA, a 1x1 image and EXIF-rotated JPEGs (orientation 6 and 3),
whose boxes only land right if the decoder uses PIL's ``exif_transpose`` frame.
"""
from __future__ import annotations

import dataclasses
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from common.cache_format import CacheError, CacheReader, CacheWriter
from common.cache_storage import restore_targets
from common.config import CropConfig
from common.crops import boxes as crop_boxes
from common.crops import centre_box, image_boxes
from common.images import ImageError
from common.models import Preprocess
from common import render
from common.render import View, decode, render_crops
from common.runtime import Runtime
from common.runtime import to_device as real_to_device
from data_manifests.build import build_manifest
from stage2_student_distill import loaders
from stage2_student_distill.loaders import Batch, build_loader, dali_available
from stage2_student_distill.plan import epoch_crops

NUM_CROPS = 4  # C
NUM_CLASSES = 7  # the teachers' classes (the manifest has 2)
TOPK = 3
SEED = 11
CPU = Runtime(device=torch.device("cpu"), dtype=torch.float32, channels_last=False, num_workers=2)
needs_dali = pytest.mark.skipif(not dali_available(), reason="nvidia-dali not installed")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")
KINDS = ["torch", pytest.param("dali", marks=needs_dali)]

# Mean |torch - DALI| in uint8 levels. Both resize the same decoded pixels with
# antialiasing; they differ only in filter details and rounding, most where a crop
# is shrunk a lot. Measured on photo-like images: 0.02-0.06 in these tests, 0.004
# (224 px) / 0.13 (64 px) for random crops of 500x375 JPEGs, 0.78 at a 40x
# shrink (640x480 -> 16 px). 1.5 levels (0.6% of the range) leaves margin, yet a
# wrong box, flip or orientation gives tens of levels.
MEAN_TOLERANCE = 1.5


def preprocess(interpolation="bilinear", size=24):
    return Preprocess(size, interpolation, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 0.875)


def photo(h: int, w: int, seed: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(1, 3, max(2, h // 8), max(2, w // 8), generator=g)
    img = F.interpolate(base, size=(h, w), mode="bicubic", align_corners=False)[0]
    img = img + 0.1 * torch.rand(3, h, w, generator=g)
    return (img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def save_exif_jpeg(path, pixels: np.ndarray, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, quality=95, exif=exif.tobytes())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loaders")
    root = tmp / "images"
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    Image.fromarray(photo(30, 40, 0)).save(root / "cat/a.png")
    Image.fromarray(photo(64, 64, 1)).save(root / "cat/b.jpg", quality=90)
    save_exif_jpeg(root / "cat/c_rot6.jpg", photo(36, 48, 2), orientation=6)  # oriented 36 x 48
    Image.fromarray(np.array([[[200, 10, 90]]], np.uint8)).save(root / "cat/d_1x1.png")
    Image.fromarray(photo(70, 50, 3)[..., 0]).save(root / "dog/e_gray.png")
    Image.fromarray(photo(80, 100, 4)).save(root / "dog/f.jpg", quality=90)
    rgba = np.concatenate([photo(48, 64, 5), np.full((48, 64, 1), 255, np.uint8)], axis=-1)
    Image.fromarray(rgba).save(root / "dog/g_rgba.png")
    save_exif_jpeg(root / "dog/h_rot3.jpg", photo(40, 30, 6), orientation=3)
    manifest = build_manifest(root, tmp / "m.parquet", progress=False)
    assert (manifest.widths[2], manifest.heights[2]) == (36, 48)  # EXIF-oriented frame

    cache_path = tmp / "cache"
    ids = manifest.image_ids
    b = image_boxes(SEED, ids, manifest.widths, manifest.heights, NUM_CROPS)
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.full(NUM_CLASSES, 0.3), size=(len(ids), NUM_CROPS))
    topk_index = np.argsort(-probs, axis=-1)[..., :TOPK]
    topk_prob = np.take_along_axis(probs, topk_index, -1)
    attrs = {
        "manifest": {"hash": manifest.content_hash, "num_images": manifest.num_images},
        "num_classes": NUM_CLASSES,
        "teachers": [],
        "ensemble": {"rule": "mean_softmax", "temperature": 1.0},
        "crops": {"num_crops": NUM_CROPS, "seed": SEED},
        "storage": {"k": TOPK, "images_per_shard": 3, "residual": "uniform"},
    }
    writer = CacheWriter(cache_path, attrs)
    for shard in range(writer.layout.num_shards):
        s, e = writer.shard_range(shard)
        writer.write_shard(shard, b.as_array()[s:e], b.flip[s:e], topk_index[s:e], topk_prob[s:e])
    cache = CacheReader(cache_path, manifest.content_hash, NUM_CLASSES)
    return {"manifest": manifest, "cache": cache}


def loader(data, kind, mode, batch_size=4, pp=None, runtime=CPU, **kw):
    if mode == "distill":
        kw.setdefault("cache", data["cache"])
    if mode == "train":
        kw.setdefault("crops", CropConfig(seed=3))
    return build_loader(
        kind, manifest=data["manifest"], mode=mode, preprocess=pp or preprocess(), batch_size=batch_size,
        runtime=runtime, seed=SEED, **kw,
    )  # fmt: skip


def pixels(batch: Batch, pp: Preprocess) -> torch.Tensor:
    """Undo the normalisation: float [B, 3, S, S] in uint8 levels."""
    mean = torch.tensor(pp.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(pp.std).view(1, 3, 1, 1) * 255
    return batch.images * std + mean


def reference(data, image_id: int, box, flip, pp) -> torch.Tensor:
    """The teacher's view at the student's size: common.render of the given box."""
    image = decode(data["manifest"].abspath(image_id))
    return render_crops(image, [box], [flip], pp.input_size, pp.interpolation)[0].float()


def check_distill_batch(data, batch: Batch, pp, exact: bool) -> list[float]:
    cache = data["cache"]
    rows = cache.gather(batch.image_ids.numpy(), batch.crop_ids.numpy())
    assert torch.equal(batch.sample_ids, batch.image_ids * NUM_CROPS + batch.crop_ids)
    assert torch.allclose(batch.targets, restore_targets(rows["topk_index"], rows["topk_prob"], NUM_CLASSES))
    assert torch.equal(batch.labels, torch.from_numpy(data["manifest"].labels[batch.image_ids.numpy()]).long())
    got, diffs = pixels(batch, pp), []
    for i in range(len(batch.image_ids)):
        ref = reference(data, int(batch.image_ids[i]), rows["boxes"][i], rows["flip"][i], pp)
        if exact:
            assert torch.allclose(got[i], ref, atol=1e-3)
        diffs.append((got[i] - ref).abs().mean().item())
    return diffs


def test_distill_torch_replays_cached_crops_and_targets(data):
    pp = preprocess()
    ld = loader(data, "torch", "distill")
    batches = list(ld.epoch(0))
    assert len(batches) == len(ld) == 2 and ld.num_samples_per_epoch == 8
    seen = torch.cat([b.image_ids for b in batches])
    assert sorted(seen.tolist()) == list(range(8))  # one crop of every image per epoch
    expected = epoch_crops(SEED, seen.numpy(), 0, NUM_CROPS)[:, 0]
    assert np.array_equal(torch.cat([b.crop_ids for b in batches]).numpy(), expected)
    for b in batches:
        assert b.images.dtype == torch.float32 and b.images.shape == (4, 3, 24, 24)
        assert b.image_ids.dtype == b.crop_ids.dtype == b.sample_ids.dtype == b.labels.dtype == torch.int64
        check_distill_batch(data, b, pp, exact=True)


def test_next_epoch_planned_ahead_equals_planned_fresh(data, monkeypatch):
    ld = loader(data, "torch", "distill")
    list(ld.epoch(0))
    assert ld._next is not None and ld._next[0] == 1  # epoch 1 was planned while epoch 0 ran
    ld._next[1].result()
    calls = []
    monkeypatch.setattr(ld, "_plan", lambda e: calls.append(e) or loaders.Loader._plan(ld, e))
    ahead = [b.sample_ids for b in ld.epoch(1)]  # the plan built ahead: no new call for epoch 1
    skipped = [b.sample_ids for b in ld.epoch(5)]  # not the expected epoch: planned now
    assert 1 not in calls and 5 in calls
    n = len(calls)
    assert ld._planned(5) is ld._planned(5) and len(calls) == n  # the epoch being replayed is not planned again
    fresh = loader(data, "torch", "distill")
    assert all(torch.equal(a, b) for a, b in zip(ahead, [b.sample_ids for b in fresh.epoch(1)]))
    assert all(torch.equal(a, b) for a, b in zip(skipped, [b.sample_ids for b in fresh.epoch(5)]))


def test_error_in_plan_built_ahead_is_raised(data, monkeypatch):
    ld = loader(data, "torch", "distill")

    def broken(epoch):
        raise CacheError(f"shard 0 damaged (epoch {epoch})")

    list(ld.epoch(0))  # epoch 1 is already being planned with the real _plan
    ld._next[1].result()
    monkeypatch.setattr(ld, "_plan", broken)
    list(ld.epoch(1))  # uses the plan built ahead; starts planning epoch 2 with the broken one
    with pytest.raises(CacheError, match="epoch 2"):
        list(ld.epoch(2))


def test_distill_ranks_read_their_own_shards(data):
    """Two ranks: disjoint equal shares, each from a subset of the cache's shards (3 images each)."""
    shares = []
    for r in range(2):
        ld = loader(data, "torch", "distill", batch_size=2, runtime=dataclasses.replace(CPU, rank=r, world_size=2))
        batches = list(ld.epoch(0))
        assert len(batches) == len(ld) == 2
        for b in batches:
            check_distill_batch(data, b, preprocess(), exact=True)
        shares.append(torch.cat([b.image_ids for b in batches]).numpy())
    assert len(set(shares[0]) | set(shares[1])) == 8  # disjoint, all 8 images
    assert all(len(np.unique(s // 3)) <= 2 for s in shares)  # of the 3 shards, at most 2 per rank


@needs_dali
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("m", [1, 2])
def test_dali_matches_torch_and_cached_view(data, interpolation, m):
    pp = preprocess(interpolation, size=32)
    torch_batches = list(loader(data, "torch", "distill", pp=pp, crops_per_image=m).epoch(1))
    dali_ld = loader(data, "dali", "distill", pp=pp, crops_per_image=m)
    assert dali_ld.kind == "dali"
    dali_batches = list(dali_ld.epoch(1))
    assert len(torch_batches) == len(dali_batches) == len(dali_ld)
    for tb, db in zip(torch_batches, dali_batches):
        assert torch.equal(tb.sample_ids, db.sample_ids)  # same samples, same (cached) boxes
        assert torch.equal(tb.targets, db.targets)
        diffs = check_distill_batch(data, db, pp, exact=False)
        batch_diff = (pixels(tb, pp) - pixels(db, pp)).abs().mean().item()
        print(f"{interpolation} m={m}: torch vs DALI mean |diff| {batch_diff:.3f} levels, per sample max {max(diffs):.3f}")
        assert batch_diff < MEAN_TOLERANCE
        assert max(diffs) < 2 * MEAN_TOLERANCE  # no single sample far off (a wrong box/flip gives tens)


@pytest.mark.parametrize("kind", KINDS)
def test_eval_every_image_once_with_centre_crops(data, kind):
    pp = preprocess()
    manifest = data["manifest"]
    ld = loader(data, kind, "eval", batch_size=3)
    batches = list(ld.epoch(5))
    assert [len(b.image_ids) for b in batches] == [3, 3, 2]  # last partial batch kept
    assert len(ld) == 3 and ld.num_samples_per_epoch == 8
    assert torch.cat([b.image_ids for b in batches]).tolist() == list(range(8))
    for b in batches:
        assert (b.crop_ids == -1).all() and torch.equal(b.sample_ids, b.image_ids) and b.targets is None
        got = pixels(b, pp)
        for i, image_id in enumerate(b.image_ids.tolist()):
            box = centre_box(int(manifest.widths[image_id]), int(manifest.heights[image_id]), pp.crop_pct)
            diff = (got[i] - reference(data, image_id, box, 0, pp)).abs().mean().item()
            assert diff < (1e-3 if kind == "torch" else MEAN_TOLERANCE)
    # two ranks: disjoint, together every image once
    shares = [
        torch.cat([b.image_ids for b in loader(data, kind, "eval", 3, runtime=dataclasses.replace(CPU, rank=r, world_size=2)).epoch(0)])
        for r in range(2)
    ]
    assert shares[0].tolist() == [0, 2, 4, 6] and shares[1].tolist() == [1, 3, 5, 7]
    first5 = loader(data, kind, "eval", batch_size=4, max_images=5)
    assert torch.cat([b.image_ids for b in first5.epoch(0)]).tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("kind", KINDS)
def test_train_mode_fresh_seeded_crops(data, kind):
    pp = preprocess()
    manifest = data["manifest"]
    crops = CropConfig(seed=3)
    ld = loader(data, kind, "train", crops=crops)
    epochs = [list(ld.epoch(e)) for e in (0, 1)]
    for e, batches in enumerate(epochs):
        for b in batches:
            assert b.targets is None and (b.crop_ids == e).all() and torch.equal(b.sample_ids, b.image_ids)
            got = pixels(b, pp)
            for i, image_id in enumerate(b.image_ids.tolist()):
                w, h = int(manifest.widths[image_id]), int(manifest.heights[image_id])
                box = crop_boxes(crops.seed, image_id, e, w, h, crops.scale, crops.ratio, crops.flip_p)
                xywh = [int(box.x), int(box.y), int(box.w), int(box.h)]
                diff = (got[i] - reference(data, image_id, xywh, int(box.flip), pp)).abs().mean().item()
                assert diff < (1e-3 if kind == "torch" else 2 * MEAN_TOLERANCE)
    order = [torch.cat([b.image_ids for b in batches]).tolist() for batches in epochs]
    assert order[0] != order[1]  # reshuffled every epoch


def test_distill_plan_deterministic_and_rank_shares(data):
    a = [b.sample_ids for b in loader(data, "torch", "distill", batch_size=2).epoch(3)]
    b = [b.sample_ids for b in loader(data, "torch", "distill", batch_size=2).epoch(3)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    c = [b.sample_ids for b in loader(data, "torch", "distill", batch_size=2).epoch(4)]
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    shares = []
    for r in range(3):
        ld = loader(data, "torch", "distill", batch_size=2, runtime=dataclasses.replace(CPU, rank=r, world_size=3))
        ids = torch.cat([b.image_ids for b in ld.epoch(3)]).tolist()
        assert len(ld) == 1 and len(ids) == 2  # 8 // 3 = 2 images per rank, one batch of 2
        shares.append(set(ids))
    assert not (shares[0] & shares[1] or shares[0] & shares[2] or shares[1] & shares[2])


def test_multi_crop_one_decode_adjacent_distinct(data, monkeypatch):
    decodes = []
    real_decode = render.decode
    monkeypatch.setattr(render, "decode", lambda path: decodes.append(path) or real_decode(path))
    ld = loader(data, "torch", "distill", batch_size=4, crops_per_image=2)
    batches = list(ld.epoch(0))
    assert len(ld) == 4 and ld.num_samples_per_epoch == 16  # 2 images x 2 crops per batch
    for b in batches:
        pairs_img = b.image_ids.view(-1, 2)
        pairs_crop = b.crop_ids.view(-1, 2)
        assert (pairs_img[:, 0] == pairs_img[:, 1]).all()  # an image's crops are adjacent
        assert (pairs_crop[:, 0] != pairs_crop[:, 1]).all()  # and distinct
        check_distill_batch(data, b, preprocess(), exact=True)
    assert len(decodes) == 8  # one decode per image, not per crop
    # over C / m = 2 epochs every cached crop of each image is used exactly once
    used = {}
    for e in range(2):
        for b in ld.epoch(e):
            for i, c in zip(b.image_ids.tolist(), b.crop_ids.tolist()):
                used.setdefault(i, []).append(c)
    assert len(used) == 8 and all(sorted(v) == list(range(NUM_CROPS)) for v in used.values())


@pytest.mark.parametrize("kind", KINDS)
def test_sample_id_mismatch_raises(data, kind, monkeypatch):
    ld = loader(data, kind, "distill")
    backend = type(ld._renderer)
    real_render = backend.render

    def corrupt(self, *args):
        out = real_render(self, *args)
        return out._replace(sample_ids=out.sample_ids.roll(1))  # as if two samples were swapped in flight

    monkeypatch.setattr(backend, "render", corrupt)
    with pytest.raises(RuntimeError, match="sample ids"):
        next(iter(ld.epoch(0)))


@pytest.mark.parametrize("kind", KINDS)
def test_decoded_frame_must_match_manifest(data, kind):
    manifest = data["manifest"]
    widths = manifest.widths.copy()
    widths[1] -= 1  # as if b.jpg had been replaced by a different file
    wrong = dataclasses.replace(manifest, widths=widths)
    ld = build_loader(kind, manifest=wrong, mode="eval", preprocess=preprocess(), batch_size=8, runtime=CPU)
    with pytest.raises(ImageError, match="decoded as 64x64"):
        list(ld.epoch(0))


@pytest.mark.parametrize("mode", ["distill", "train", "eval"])
def test_labels_reach_the_device_through_the_pinned_copy(data, mode, monkeypatch):
    """A pageable host-to-device copy makes the host wait for the whole GPU queue every step; the labels
    must take common.runtime.to_device (pinned memory + non_blocking), like the pixels and the targets."""
    returned = []

    def spy(t, device):
        out = real_to_device(t, device).clone()
        returned.append(out)
        return out

    monkeypatch.setattr(loaders, "to_device", spy)
    for b in loader(data, "torch", mode, batch_size=2).epoch(0):
        assert any(b.labels is r for r in returned)
        assert b.labels.tolist() == data["manifest"].labels[b.image_ids.numpy()].tolist()


def test_a_cached_box_outside_its_image_is_refused_by_name(data, monkeypatch):
    """A stranger's cache (other files, another orientation): refused before a sliver is rendered."""
    cache = data["cache"]
    real_gather = type(cache).gather

    def gather(self, image_ids, crop_ids):
        rows = real_gather(self, image_ids, crop_ids)
        first = int(np.flatnonzero(np.asarray(image_ids) == 2)[0])  # image 2 is 36 x 48
        rows["boxes"] = rows["boxes"].copy()
        rows["boxes"][first] = [10, 0, 30, 48]  # 10 + 30 > 36
        return rows

    monkeypatch.setattr(type(cache), "gather", gather)
    with pytest.raises(CacheError, match=r"image 2 \(cat/c_rot6.jpg\): box \[10, 0, 30, 48\] flip [01] is not inside "
                                         r"the 36x48 image; the teacher cache was built from different image files"):
        list(loader(data, "torch", "distill").epoch(0))


def test_early_break_then_next_epoch(data):
    ld = loader(data, "torch", "distill", batch_size=2)
    for _ in ld.epoch(0):
        break  # the prefetch thread must stop and not block the next epoch
    assert len(list(ld.epoch(1))) == len(ld) == 4


def test_refuses_mismatched_inputs(data):
    with pytest.raises(ValueError, match="multiple of distill.crops_per_image"):
        loader(data, "torch", "distill", batch_size=3, crops_per_image=2)
    with pytest.raises(ValueError, match="crops_per_image"):
        loader(data, "torch", "distill", batch_size=5, crops_per_image=5)
    with pytest.raises(ValueError, match="needs the teacher cache"):
        build_loader("torch", manifest=data["manifest"], mode="distill", preprocess=preprocess(), batch_size=2, runtime=CPU)
    with pytest.raises(ValueError, match="do not fill one batch"):
        loader(data, "torch", "train", batch_size=9)
    other = dataclasses.replace(data["manifest"], content_hash="0" * 64)
    with pytest.raises(CacheError, match="built for manifest"):
        build_loader("torch", manifest=other, mode="distill", preprocess=preprocess(), batch_size=2, runtime=CPU, cache=data["cache"])


@needs_dali
def test_dali_renderer_exif_frame_and_multi_crop(data):
    from common.dali_crops import DaliCropRenderer

    manifest = data["manifest"]
    files = [manifest.abspath(2), manifest.abspath(7)]  # orientation 6 (36x48) and 3 (30x40)
    boxes = np.array([[[2, 3, 20, 30], [10, 0, 26, 17]], [[0, 5, 15, 30], [4, 4, 26, 36]]], np.int32)
    flips = np.array([[0, 1], [1, 0]])
    renderer = DaliCropRenderer([View(16, "bilinear")], batch_size=1, num_threads=1, crops_per_image=2)
    (out,) = renderer(files, [boxes], flips)  # two DALI runs of one image each
    assert out.shape == (4, 3, 16, 16) and out.dtype == torch.uint8
    for n, f in enumerate(files):
        ref = render_crops(decode(f), boxes[n], flips[n], 16, "bilinear")
        assert (out[2 * n : 2 * n + 2].float() - ref.float()).abs().mean() < MEAN_TOLERANCE
        # the same box in the un-rotated file frame would be a very different picture
        wrong = render_crops(decode(f).flip(-1).flip(-2), boxes[n], flips[n], 16, "bilinear")
        assert (out[2 * n : 2 * n + 2].float() - wrong.float()).abs().mean() > 5


@needs_dali
def test_dali_device_follows_the_runtime():
    from common.dali_crops import device_id_for

    assert device_id_for(CPU) is None  # DALI's CPU backend
    assert device_id_for(dataclasses.replace(CPU, device=torch.device("cuda", 3))) == 3  # that GPU, not GPU 0


def _link_file_outside(root, tmp):
    outside = tmp / "elsewhere.png"
    shutil.move(root / "dog/e_gray.png", outside)  # the same bytes: only where they live is wrong
    os.symlink(outside, root / "dog/e_gray.png")
    return "dog/e_gray.png", "outside the data root"


def _link_folder_outside(root, tmp):
    shutil.move(root / "dog", tmp / "dog-elsewhere")
    os.symlink(tmp / "dog-elsewhere", root / "dog")
    return "dog/", "outside the data root"


def _link_file_inside(root, tmp):
    shutil.copy(root / "dog/e_gray.png", root / "cat/copy.png")
    (root / "dog/e_gray.png").unlink()
    os.symlink(root / "cat/copy.png", root / "dog/e_gray.png")
    return "dog/e_gray.png", "is a symbolic link to"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("plant", [_link_file_outside, _link_folder_outside, _link_file_inside])
def test_symlink_planted_after_the_build_stops_the_epoch_by_name(data, tmp_path, kind, plant):
    """The builder refuses symlinks; one that appears later is refused at read time, every epoch."""
    root = shutil.copytree(data["manifest"].root, tmp_path / "images")
    manifest = build_manifest(root, tmp_path / "m.parquet", progress=False)
    assert len(list(loader({"manifest": manifest}, kind, "eval").epoch(0))) == 2  # 8 images, batches of 4
    where, reason = plant(root, tmp_path)
    with pytest.raises(ImageError, match=reason) as err:
        list(loader({"manifest": manifest}, kind, "eval").epoch(0))
    assert where in str(err.value)


# --------------------------------------------------------------------------- CUDA twins (skipped without a GPU)


def cuda_runtime() -> Runtime:
    return Runtime(device=torch.device("cuda", torch.cuda.current_device()), dtype=torch.bfloat16,
                   channels_last=True, num_workers=2)


def on_cpu(batch: Batch) -> Batch:
    return dataclasses.replace(batch, **{f.name: getattr(batch, f.name).cpu() for f in dataclasses.fields(batch)
                                         if isinstance(getattr(batch, f.name), torch.Tensor)})


@needs_cuda
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_batches_equal_the_cpu_batches(data, kind):
    """The GPU path serves the CPU path's samples and targets. torch: the same rendered pixels behind
    pinned, non-blocking copies (a missing wait would show as garbage); DALI: the "mixed" (GPU)
    decoder, within the resamplers' tolerance."""
    pp = preprocess(size=32)
    cpu_batches = list(loader(data, "torch", "distill", pp=pp).epoch(1))
    gpu_loader = loader(data, kind, "distill", pp=pp, runtime=cuda_runtime())
    gpu_batches = []
    for batch in gpu_loader.epoch(1):
        assert batch.images.is_cuda and batch.targets.is_cuda and batch.labels.is_cuda
        assert batch.images.is_contiguous(memory_format=torch.channels_last)
        gpu_batches.append(on_cpu(batch))
    assert len(gpu_batches) == len(cpu_batches) == len(gpu_loader)
    for cb, gb in zip(cpu_batches, gpu_batches):
        assert torch.equal(gb.sample_ids, cb.sample_ids) and torch.equal(gb.labels, cb.labels)
        torch.testing.assert_close(gb.targets, cb.targets)
        if kind == "torch":
            torch.testing.assert_close(gb.images, cb.images, atol=1e-5, rtol=0)
        else:
            diff = (pixels(gb, pp) - pixels(cb, pp)).abs().flatten(1).mean(1)
            assert diff.max() < 2 * MEAN_TOLERANCE, diff


@needs_cuda
@needs_dali
@pytest.mark.parametrize("m", [1, 2])
def test_dali_mixed_decoder_matches_the_cpu_decoder(data, m):
    """m = 1 decodes only the box (ROI decode), m = 2 one full decode sliced twice; EXIF frames included."""
    from common.dali_crops import DaliCropRenderer

    manifest = data["manifest"]
    files = [manifest.abspath(i) for i in range(manifest.num_images)]
    b = image_boxes(SEED, manifest.image_ids, manifest.widths, manifest.heights, m)
    args = dict(views=[View(24, "bilinear")], batch_size=3, num_threads=2, crops_per_image=m)
    (cpu,) = DaliCropRenderer(**args)(files, [b.as_array()], b.flip)
    (gpu,) = DaliCropRenderer(**args, device_id=torch.cuda.current_device())(files, [b.as_array()], b.flip)
    assert gpu.is_cuda and gpu.dtype == torch.uint8 and gpu.shape == cpu.shape == (len(files) * m, 3, 24, 24)
    diff = (gpu.cpu().float() - cpu.float()).abs().flatten(1).mean(1)
    assert diff.max() < MEAN_TOLERANCE, diff
