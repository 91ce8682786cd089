"""Awkward and bad inputs through teacher-cache: decoded, cropped and cached, or refused by name.

Manifest-level rejections (truncated, non-image, zero-byte, symlink, duplicate...) are in
tests/test_manifest.py; here each input goes on to decoding and crop rendering, and files that
change after the manifest was built stop the run without losing finished shards.
"""
from __future__ import annotations

import os
import shutil
import struct
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from PIL import Image

from common.cache_format import CacheReader, verify_cache
from stage2_student_distill.app.cli import main
from common.images import ImageError
from common.manifest import load_manifest
from common.render import decode
from data_manifests.build import ManifestBuildError, build_manifest, rejects_path
from stage1_fixtures import config, dataset  # noqa: F401
from stage1_teacher_cache.run import run

ARRAYS = ("boxes", "flip", "topk_index", "topk_prob")
LARGE = 8000  # 64 Mpx: decodes (Pillow's bomb limit is 89 Mpx); 20000 x 20000 is refused, see below


def solid_png(path: Path, width: int, height: int, bit_depth: int = 8) -> None:
    """A one-colour grayscale PNG written row by row: no full-size image in memory."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\0" + b"\x5a" * (-(-width * bit_depth // 8))  # filter byte + samples
    z = zlib.compressobj(9)
    body = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    header = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def save(img: Image.Image, path: Path, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kwargs)


def random_rgb(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def odd_tree(root: Path) -> Path:
    """One file per awkward-but-valid kind; two classes."""
    save(random_rgb(40, 30, 1).convert("CMYK"), root / "a" / "cmyk.jpg")
    deep = np.random.default_rng(2).integers(0, 65536, (36, 48), dtype=np.uint16)
    save(Image.fromarray(deep), root / "a" / "deep16.png")
    save(random_rgb(33, 50, 3).convert("L"), root / "a" / "gray.png")
    rgba = random_rgb(41, 29, 4).convert("RGBA")
    rgba.putalpha(Image.fromarray(np.random.default_rng(5).integers(0, 256, (29, 41), dtype=np.uint8)))
    save(rgba, root / "b" / "rgba.png")
    raw = random_rgb(30, 14, 6)
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise
    save(raw, root / "b" / "rotated.png", exif=exif.tobytes())
    save(raw.transpose(Image.Transpose.ROTATE_270), root / "b" / "upright.png")  # the same picture, as displayed
    save(random_rgb(1, 1, 7), root / "b" / "tiny.png")
    return root


def test_awkward_images_are_decoded_cropped_and_cached(tmp_path):
    root = odd_tree(tmp_path / "images")
    manifest_path = tmp_path / "m.parquet"
    manifest = build_manifest(root, manifest_path, progress=False)
    assert manifest.num_images == 7 and not rejects_path(manifest_path).exists()
    i = manifest.paths.index
    assert (manifest.widths[i("b/rotated.png")], manifest.heights[i("b/rotated.png")]) == (14, 30)
    assert torch.equal(decode(root / "b" / "rotated.png"), decode(root / "b" / "upright.png"))

    cache = tmp_path / "cache"
    summary = run(config(manifest_path, cache))
    assert summary["images"] == 7 and verify_cache(cache, manifest_hash=manifest.content_hash) == []
    reader = CacheReader(cache)
    boxes = np.asarray(reader.arrays["boxes"][:]).astype(np.int64)
    assert ((boxes[..., 0] + boxes[..., 2]) <= manifest.widths[:, None]).all()
    assert ((boxes[..., 1] + boxes[..., 3]) <= manifest.heights[:, None]).all()
    assert (boxes[i("b/tiny.png")] == [0, 0, 1, 1]).all()  # the only crop a 1x1 image has
    prob = np.asarray(reader.arrays["topk_prob"][:]).astype(np.float32)
    assert np.isfinite(prob).all() and (prob.sum(-1) <= 1.001).all()


def test_a_large_image_is_decoded_and_cropped(tmp_path):
    """8000 x 8000 (192 MB as RGB): one crop, one teacher, one render thread to bound memory
    (each crop is resized from float32: up to 768 MB for a full-image box); see docs/reliability.md."""
    root = tmp_path / "images"
    solid_png(root / "a" / "large.png", LARGE, LARGE)
    save(random_rgb(10, 10, 0), root / "a" / "small.png")
    manifest = build_manifest(root, tmp_path / "m.parquet", progress=False)
    assert (manifest.widths[0], manifest.heights[0]) == (LARGE, LARGE)
    cache = tmp_path / "cache"
    run(config(tmp_path / "m.parquet", cache, **{"runtime.num_workers": 1, "crops.num_crops": 1,
                                                "teacher_cache.teachers": ["test_resnet"],
                                                "teacher_cache.input_sizes": ["test_resnet=32"]}))
    assert verify_cache(cache) == []
    x, y, w, h = CacheReader(cache).arrays["boxes"][0, 0]
    assert x + w <= LARGE and y + h <= LARGE and w * h >= 0.08 * LARGE * LARGE * 0.99


def test_an_image_over_the_decompression_bomb_limit_is_refused_by_name(tmp_path):
    root = tmp_path / "images"
    save(random_rgb(10, 10, 0), root / "a" / "ok.png")
    solid_png(root / "a" / "huge.png", 20000, 20000, bit_depth=1)  # 400 Mpx: 1.2 GB as RGB
    with pytest.raises(ManifestBuildError, match=r"a/huge\.png: image too large to decode safely"):
        build_manifest(root, tmp_path / "m.parquet", progress=False)
    manifest = build_manifest(root, tmp_path / "m.parquet", skip_bad=True, progress=False)
    assert manifest.paths == ["a/ok.png"] and "a/huge.png" in rejects_path(tmp_path / "m.parquet").read_text()


@pytest.fixture(scope="module")
def intact(dataset):  # noqa: F811
    """A copy of the stage-1 images with its own manifest and an uninterrupted cache of it."""
    tmp = dataset["tmp"] / "changed-files"
    root = shutil.copytree(load_manifest(dataset["train"]).root, tmp / "images")
    manifest = tmp / "m.parquet"
    build_manifest(root, manifest, progress=False)
    reference = tmp / "reference"
    run(config(manifest, reference))
    return {"tmp": tmp, "root": root, "manifest": manifest, "reference": reference}


def _truncate(path: Path, tmp: Path) -> None:
    path.write_bytes(path.read_bytes()[:200])


def _text(path: Path, tmp: Path) -> None:
    path.write_text("not pixels")


def _smaller(path: Path, tmp: Path) -> None:
    random_rgb(5, 5, 9).save(path, format="PNG")


def _symlink_out(path: Path, tmp: Path) -> None:
    outside = tmp / "outside.png"
    shutil.copy(path, outside)  # the same bytes: only where they live is wrong
    path.unlink()
    os.symlink(outside, path)


@pytest.mark.parametrize("change, reason", [
    (_truncate, "truncated or corrupt image"),
    (_text, "not an image file"),
    (_smaller, r"decoded as 5x5 \(after EXIF orientation\) but the manifest says \d+x\d+; the file changed"),
    (_symlink_out, "outside the data root"),
], ids=["truncated", "not-an-image", "replaced-by-smaller", "symlink-out-of-root"])
def test_a_file_changed_after_the_manifest_stops_the_run_by_name_keeping_finished_shards(intact, change, reason):
    manifest = load_manifest(intact["manifest"])
    victim = 5  # in shard 1 (shards of 4 images)
    path = intact["root"] / manifest.paths[victim]
    original = path.read_bytes()
    cache = intact["tmp"] / f"cache-{change.__name__}"
    try:
        change(path, intact["tmp"])
        with pytest.raises(ImageError, match=reason) as err:
            run(config(intact["manifest"], cache))
        assert manifest.paths[victim] in str(err.value)
        assert CacheReader(cache, require_complete=False).complete.tolist() == [True, False, False]
    finally:
        path.unlink()
        path.write_bytes(original)
    summary = run(config(intact["manifest"], cache))
    assert summary["shards_written"] == 2 and summary["shards_skipped"] == 1
    got, want = CacheReader(cache), CacheReader(intact["reference"])
    for name in ARRAYS:
        assert np.array_equal(got.arrays[name][:], want.arrays[name][:]), name


def test_a_cache_from_a_newer_format_is_refused_with_an_upgrade_message(intact, tmp_path):
    cache = shutil.copytree(intact["reference"], tmp_path / "future")
    zarr.open_group(str(cache), mode="r+").attrs["version"] = 2
    runner = CliRunner()
    for args in (["cache", "info", str(cache)], ["cache", "verify", str(cache)],
                 ["cache", "merge", str(cache), str(intact["reference"]), "--out", str(tmp_path / "m")],
                 ["cache", "pack", str(cache), "--out", str(tmp_path / "p.tar")]):
        result = runner.invoke(main, args)
        assert result.exit_code == 1, (args, result.output)
        assert "newer than this tool reads (v1); upgrade the pipeline package" in result.output, result.output
    with pytest.raises(ValueError, match="newer than this tool reads"):
        run(config(intact["manifest"], cache))
    with pytest.raises(ValueError, match="newer than this tool reads"):
        run(config(intact["manifest"], tmp_path / "new"), reuse_crops=str(cache))


def test_oversized_or_foreign_cache_metadata_is_refused_before_parsing(intact, tmp_path):
    """A stranger's cache cannot make a reader parse huge JSON or decode with other codecs."""
    big = shutil.copytree(intact["reference"], tmp_path / "big")
    meta = big / "zarr.json"
    meta.write_bytes(meta.read_bytes()[:-1] + b" " * (17 << 20) + b"}")
    with pytest.raises(ValueError, match=r"zarr.json is 17,[\d,]+ bytes, over the"):
        CacheReader(big)
    foreign = shutil.copytree(intact["reference"], tmp_path / "foreign")
    array_meta = foreign / "topk_prob" / "zarr.json"
    array_meta.write_text(array_meta.read_text().replace('"name": "zstd"', '"name": "gzip"')
                          .replace('"checksum": false', '"level": 5').replace('"level": 3,', ""))
    with pytest.raises(ValueError, match=r"array topk_prob uses codecs \['gzip'\]"):
        CacheReader(foreign)
    grown = shutil.copytree(intact["reference"], tmp_path / "grown")
    zarr.open_group(str(grown), mode="r+").attrs["storage"] = dict(
        CacheReader(intact["reference"]).attrs["storage"], images_per_shard=10**9)
    with pytest.raises(ValueError, match="a shard would decode to 48,000,000,000 bytes, over the 268,435,456 limit"):
        CacheReader(grown)



# -- stage 2: files and caches that no longer fit the manifest stop `pipeline distill` by name


@pytest.fixture()
def distill_inputs(tmp_path):
    """Train/val manifests of six and three 32x32 images and a valid teacher cache written directly
    (boxes inside every image), so each test can break exactly one thing."""
    from common.cache_format import CacheWriter

    paths = {}
    for split, count in (("train", 6), ("val", 3)):
        root = tmp_path / split
        for i in range(count):
            save(random_rgb(32, 32, 10 * i + len(split)), root / ("a" if i % 2 else "b") / f"{i}.png")
        paths[split] = tmp_path / f"{split}.parquet"
        build_manifest(root, paths[split], progress=False)
    manifest = load_manifest(paths["train"])
    attrs = {
        "manifest": {"hash": manifest.content_hash, "num_images": manifest.num_images},
        "num_classes": manifest.num_classes,
        "teachers": [{"name": "t", "timm_name": "t", "weights": "file", "weights_sha256": "cd" * 32}],
        "ensemble": {"rule": "mean_softmax", "temperature": 1.0},
        "crops": {"num_crops": 2, "seed": 0},
        "storage": {"k": 1, "images_per_shard": 8, "residual": "uniform"},
    }

    def write_cache(boxes: np.ndarray) -> Path:
        writer = CacheWriter(tmp_path / "cache", attrs)
        n = manifest.num_images
        writer.write_shard(0, boxes, np.zeros((n, 2)), np.zeros((n, 2, 1)), np.full((n, 2, 1), 0.9))
        return tmp_path / "cache"

    def distill(loader: str):
        return CliRunner().invoke(main, [
            "--set", "runtime.device=cpu", "--set", "runtime.progress=false",
            "distill", "--manifest", str(paths["train"]), "--val-manifest", str(paths["val"]),
            "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / f"run-{loader}"), "--student", "test_resnet",
            "--img-size", "32", "--epochs", "1", "--batch-size", "2", "--eval-batch-size", "3",
            "--loader", loader, "--num-workers", "1"])

    inside = np.tile(np.array([2, 3, 20, 24], dtype=np.int32), (manifest.num_images, 2, 1))
    return SimpleNamespace(manifest=manifest, write_cache=write_cache, distill=distill, inside=inside)


def _loaders():
    from stage2_student_distill.loaders import dali_available

    dali = pytest.param("dali", marks=pytest.mark.skipif(not dali_available(), reason="nvidia-dali is not installed"))
    return ["torch", dali]


def _user_error(result) -> str:
    """The CLI's output for an expected failure: exit 1, one line, no traceback."""
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), (result.output, result.exception)
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0][len("Error: "):]


def test_distill_refuses_a_cached_box_outside_its_image_by_name(distill_inputs):
    boxes = distill_inputs.inside.copy()
    boxes[4, 1] = [20, 3, 20, 24]  # x + w = 40 > 32
    distill_inputs.write_cache(boxes)
    line = _user_error(distill_inputs.distill("torch"))
    assert f"image 4 ({distill_inputs.manifest.paths[4]}): box [20, 3, 20, 24] flip 0 is not inside the 32x32 image" in line
    assert "rebuild it for this manifest" in line


@pytest.mark.parametrize("loader", _loaders())
def test_distill_stops_by_name_when_a_file_changed_size_after_the_manifest(distill_inputs, loader):
    distill_inputs.write_cache(distill_inputs.inside)
    m = distill_inputs.manifest
    for i in range(m.num_images):  # every image: whichever the first batch holds
        random_rgb(40, 36, i).save(m.root / m.paths[i], format="PNG")
    line = _user_error(distill_inputs.distill(loader))
    assert "decoded as 40x36 (after EXIF orientation) but the manifest says 32x32" in line
    assert any(line.startswith(f"{m.root / p}:") for p in m.paths), line


@pytest.mark.parametrize("loader", _loaders())
def test_distill_names_a_file_truncated_after_the_manifest(distill_inputs, loader):
    distill_inputs.write_cache(distill_inputs.inside)
    m = distill_inputs.manifest
    for p in m.paths:
        _truncate(m.root / p, m.root)
    line = _user_error(distill_inputs.distill(loader))
    assert "truncated or corrupt image" in line and any(line.startswith(f"{m.root / p}:") for p in m.paths), line
