"""Manifest building, reading and image decoding on small generated trees."""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from common.images import ImageError, decoded_size, open_image
from common.manifest import (
    MANIFEST_FORMAT,
    SCHEMA,
    ManifestError,
    ManifestRow,
    content_hash,
    load_manifest,
    write_manifest,
)
from data_manifests.build import ManifestBuildError, build_manifest, format_manifest_info, manifest_info, rejects_path
from data_manifests.cli import manifest_group

# (class, file name, size, format); distinct colours make every file's content unique.
GOOD_FILES = [
    ("cat", "a.png", (12, 8), "PNG"),
    ("cat", "b.jpg", (16, 10), "JPEG"),
    ("cat", "sub/c.png", (9, 9), "PNG"),
    ("dog", "d.JPEG", (20, 6), "JPEG"),
    ("dog", "e.bmp", (7, 11), "BMP"),
]


def _image_bytes(size: tuple[int, int], fmt: str, seed: int, **save_kwargs) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt, **save_kwargs)
    return buf.getvalue()


def make_tree(root: Path) -> Path:
    for seed, (cls, name, size, fmt) in enumerate(GOOD_FILES):
        path = root / cls / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_image_bytes(size, fmt, seed))
    (root / "cat" / ".DS_Store").write_bytes(b"hidden files are ignored")
    return root


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "data")


def test_build_small_tree(tree: Path, tmp_path: Path):
    out = tmp_path / "m.parquet"
    manifest = build_manifest(tree, out, description="tiny", progress=False)

    table = pq.read_table(out)
    assert table.schema.equals(SCHEMA, check_metadata=False)
    meta = {k.decode(): json.loads(v) for k, v in table.schema.metadata.items()}
    assert meta["meal.format"] == MANIFEST_FORMAT and meta["meal.version"] == 1
    assert meta["meal.class_names"] == ["cat", "dog"]
    assert meta["meal.root"] == str(tree.resolve()) and meta["meal.description"] == "tiny"
    assert meta["meal.hash_algorithm"] == "sha256"
    assert meta["meal.content_hash"] == content_hash(table) == manifest.content_hash

    expected = sorted((f"{cls}/{name}", label, size) for cls, name, size, _ in GOOD_FILES
                      for label in [["cat", "dog"].index(cls)])  # fmt: skip
    assert manifest.num_images == 5 and manifest.num_classes == 2
    assert manifest.image_ids.tolist() == list(range(5))
    assert manifest.paths == [p for p, _, _ in expected]
    assert manifest.labels.tolist() == [label for _, label, _ in expected]
    assert manifest.widths.tolist() == [s[0] for _, _, s in expected]
    assert manifest.heights.tolist() == [s[1] for _, _, s in expected]
    for i, rel in enumerate(manifest.paths):
        data = (tree / rel).read_bytes()
        assert manifest.file_bytes[i] == len(data)
        assert table.column("sha256")[i].as_py() == hashlib.sha256(data).hexdigest()
        assert manifest.abspath(i) == tree.resolve() / rel
    assert not rejects_path(out).exists()


def test_hash_stable_across_builds_and_moves(tree: Path, tmp_path: Path):
    first = build_manifest(tree, tmp_path / "1.parquet", progress=False)
    second = build_manifest(tree, tmp_path / "2.parquet", description="other text", progress=False)
    moved = shutil.copytree(tree, tmp_path / "elsewhere" / "data")
    third = build_manifest(moved, tmp_path / "3.parquet", progress=False)
    assert first.content_hash == second.content_hash == third.content_hash
    assert third.root == moved.resolve()

    relocated = load_manifest(tmp_path / "1.parquet", data_root=moved)
    assert relocated.root == moved.resolve()
    assert all(relocated.abspath(i).is_file() for i in range(relocated.num_images))


def test_hash_is_the_documented_encoding_whatever_the_chunk_size(tree: Path, tmp_path: Path, monkeypatch):
    """The hash is fed in chunks of rows; the digest must be that of the whole encoding at once."""
    import common.manifest as manifest_module

    m = build_manifest(tree, tmp_path / "m.parquet", progress=False)
    header = {"format": MANIFEST_FORMAT, "version": manifest_module.MANIFEST_VERSION,
              "hash_algorithm": manifest_module.HASH_ALGORITHM, "class_names": list(m.class_names),
              "num_images": m.num_images, "hash_scheme": 2}
    table = pq.read_table(tmp_path / "m.parquet")
    whole = hashlib.sha256()
    whole.update(json.dumps(header, sort_keys=True, ensure_ascii=False).encode("utf-8"))
    whole.update(np.arange(m.num_images, dtype="<i8").tobytes() + m.labels.astype("<i4").tobytes())
    whole.update(m.widths.astype("<i4").tobytes() + m.heights.astype("<i4").tobytes())
    whole.update("\0".join(m.paths).encode("utf-8") + "".join(table.column("sha256").to_pylist()).encode("ascii"))
    assert m.content_hash == whole.hexdigest()
    for chunk in (1, 2, 3):
        monkeypatch.setattr(manifest_module, "_HASH_CHUNK", chunk)
        assert content_hash(table) == whole.hexdigest()
        assert load_manifest(tmp_path / "m.parquet").content_hash == whole.hexdigest()


def test_exif_rotated_jpeg_swaps_width_and_height(tree: Path, tmp_path: Path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tree / "dog" / "rotated.jpg"
    path.write_bytes(_image_bytes((30, 14), "JPEG", seed=99, exif=exif.tobytes()))

    assert decoded_size(path.read_bytes(), "rotated.jpg") == (14, 30)
    assert open_image(path).size == (14, 30)
    manifest = build_manifest(tree, tmp_path / "m.parquet", progress=False)
    i = manifest.paths.index("dog/rotated.jpg")
    assert (manifest.widths[i], manifest.heights[i]) == (14, 30)


def _truncated(root: Path) -> tuple[str, str]:
    data = _image_bytes((64, 64), "JPEG", seed=7)
    (root / "cat" / "broken.jpg").write_bytes(data[: len(data) // 2])
    return "cat/broken.jpg", "truncated or corrupt image"


def _not_an_image(root: Path) -> tuple[str, str]:
    (root / "dog" / "notes.jpg").write_text("this is text, not a JPEG")
    return "dog/notes.jpg", "not an image file"


def _zero_bytes(root: Path) -> tuple[str, str]:
    (root / "dog" / "empty.png").touch()
    return "dog/empty.png", "zero-byte file"


def _empty_class(root: Path) -> tuple[str, str]:
    (root / "eel").mkdir()
    return "eel", "empty class folder"


def _symlink_outside(root: Path) -> tuple[str, str]:
    outside = root.parent / "outside.png"
    outside.write_bytes(_image_bytes((5, 5), "PNG", seed=42))
    os.symlink(outside, root / "cat" / "link.png")
    return "cat/link.png", "symbolic link"


def _duplicate(root: Path) -> tuple[str, str]:
    shutil.copy(root / "cat" / "a.png", root / "dog" / "z_copy.png")
    return "dog/z_copy.png", "duplicate content: same sha256 as cat/a.png"


def _wrong_extension(root: Path) -> tuple[str, str]:
    (root / "cat" / "readme.txt").write_text("notes")
    return "cat/readme.txt", "not an image file extension"


def _loose_file(root: Path) -> tuple[str, str]:
    (root / "stray.png").write_bytes(_image_bytes((5, 5), "PNG", seed=43))
    return "stray.png", "outside any class folder"


BAD_INPUTS = [_truncated, _not_an_image, _zero_bytes, _empty_class, _symlink_outside,
              _duplicate, _wrong_extension, _loose_file]  # fmt: skip


@pytest.mark.parametrize("make_bad", BAD_INPUTS, ids=lambda f: f.__name__.strip("_"))
def test_bad_input_fails_then_is_recorded_with_skip_bad(tree: Path, tmp_path: Path, make_bad):
    rel, reason = make_bad(tree)
    out = tmp_path / "m.parquet"

    with pytest.raises(ManifestBuildError) as err:
        build_manifest(tree, out, progress=False)
    message = str(err.value)
    assert rel in message and reason in message
    assert "--skip-bad" in message and str(rejects_path(out)) in message
    assert not out.exists()

    manifest = build_manifest(tree, out, skip_bad=True, progress=False)
    rejects = [json.loads(line) for line in rejects_path(out).read_text().splitlines()]
    assert len(rejects) == 1 and rejects[0]["path"] == rel and reason in rejects[0]["reason"]
    assert sorted(manifest.paths) == sorted(f"{cls}/{name}" for cls, name, _, _ in GOOD_FILES)
    if make_bad is _empty_class:  # the class keeps its index, with no images
        assert manifest.class_names == ("cat", "dog", "eel")
        assert not (manifest.labels == 2).any()


def test_all_problems_reported_together_and_stale_rejects_removed(tree: Path, tmp_path: Path):
    created = [make_bad(tree)[0] for make_bad in (_truncated, _zero_bytes, _duplicate)]
    out = tmp_path / "m.parquet"
    with pytest.raises(ManifestBuildError, match="3 problem") as err:
        build_manifest(tree, out, progress=False)
    assert all(rel in str(err.value) for rel in created)

    build_manifest(tree, out, skip_bad=True, progress=False)
    assert rejects_path(out).exists()
    for rel in created:
        (tree / rel).unlink()
    build_manifest(tree, out, progress=False)
    assert not rejects_path(out).exists()


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda root: None, "does not exist"),
        (lambda root: root.write_text("x"), "is not a directory"),
        (lambda root: root.mkdir(), "has no class folders"),
    ],
    ids=["missing", "file", "no-classes"],
)
def test_unusable_root(tmp_path: Path, setup, message):
    root = tmp_path / "root"
    setup(root)
    with pytest.raises(ManifestBuildError, match=message) as err:
        build_manifest(root, tmp_path / "m.parquet", progress=False)
    assert str(root) in str(err.value)


def test_load_rejects_edited_manifest(tree: Path, tmp_path: Path):
    out = tmp_path / "m.parquet"
    build_manifest(tree, out, progress=False)
    table = pq.read_table(out)
    labels = table.column("label").to_numpy().copy()
    labels[0] = 1 - labels[0]
    edited = table.set_column(table.schema.get_field_index("label"), "label", pa.array(labels, pa.int32()))
    pq.write_table(edited.replace_schema_metadata(table.schema.metadata), out)

    with pytest.raises(ManifestError, match="was edited after it was built") as err:
        load_manifest(out)
    assert str(out) in str(err.value) and "pipeline manifest build" in str(err.value)


@pytest.mark.parametrize("bad_path", ["../escape.png", "/abs/x.png", "cat/../../x.png"])
def test_load_rejects_unsafe_path_even_with_valid_hash(tree: Path, tmp_path: Path, bad_path: str):
    out = tmp_path / "m.parquet"
    build_manifest(tree, out, progress=False)
    table = pq.read_table(out)
    paths = table.column("path").to_pylist()
    paths[0] = bad_path
    forged = table.set_column(table.schema.get_field_index("path"), "path", pa.array(paths, pa.string()))
    metadata = dict(table.schema.metadata)
    metadata[b"meal.content_hash"] = json.dumps(content_hash(forged)).encode()
    pq.write_table(forged.replace_schema_metadata(metadata), out)

    with pytest.raises(ManifestError, match="image 0 path") as err:
        load_manifest(out)
    assert bad_path in str(err.value)


def test_write_rejects_unsafe_path(tmp_path: Path):
    row = ManifestRow("../x.png", 0, 1, 1, 1, "0" * 64)
    with pytest.raises(ManifestError, match=r"contains '\.\.'"):
        write_manifest([row], ["a"], tmp_path, tmp_path / "m.parquet")


def test_load_missing_or_foreign_file(tmp_path: Path):
    with pytest.raises(ManifestError, match="build one with `pipeline manifest build ROOT --out M.parquet`"):
        load_manifest(tmp_path / "nope.parquet")
    foreign = tmp_path / "foreign.parquet"
    pq.write_table(pa.table({"x": [1]}), foreign)
    with pytest.raises(ManifestError, match="not a MEAL V2 manifest"):
        load_manifest(foreign)


def test_manifest_info(tree: Path, tmp_path: Path):
    out = tmp_path / "m.parquet"
    manifest = build_manifest(tree, out, progress=False)
    info = manifest_info(out)
    assert info["num_images"] == 5 and info["images_per_class"] == {"cat": 3, "dog": 2}
    assert info["width"] == {"min": 7, "median": 12.0, "max": 20}
    assert info["content_hash"] == manifest.content_hash
    assert info["total_bytes"] == int(manifest.file_bytes.sum())
    text = format_manifest_info(info)
    assert manifest.content_hash in text and "cat" in text


def _save(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def test_image_modes_decode_to_rgb_uint8(tmp_path: Path):
    gradient16 = np.array([[0, 256, 32768, 65535]], dtype=np.uint16)
    palette = Image.new("P", (3, 2))
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.info["transparency"] = 0
    cases = {
        "gray.png": _save(Image.new("L", (4, 3), 77), "PNG"),
        "rgba.png": _save(Image.new("RGBA", (4, 3), (10, 20, 30, 0)), "PNG"),
        "deep.png": _save(Image.fromarray(gradient16), "PNG"),
        "cmyk.jpg": _save(Image.new("CMYK", (4, 3), (0, 255, 255, 0)), "JPEG"),
        "palette.png": _save(palette, "PNG"),
        "anim.gif": _save(Image.new("P", (4, 3), 1), "GIF"),
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        img = open_image(tmp_path / name)
        pixels = np.asarray(img)
        assert img.mode == "RGB" and pixels.dtype == np.uint8 and pixels.ndim == 3, name
    assert np.asarray(open_image(tmp_path / "gray.png"))[0, 0].tolist() == [77, 77, 77]
    assert np.asarray(open_image(tmp_path / "rgba.png"))[0, 0].tolist() == [10, 20, 30]
    # 16-bit samples are scaled (high byte), not clipped to 255 as Image.convert does.
    assert np.asarray(open_image(tmp_path / "deep.png"))[0, :, 0].tolist() == [0, 1, 128, 255]
    red = np.asarray(open_image(tmp_path / "cmyk.jpg"))[0, 0]
    assert red[0] > 200 and red[1] < 60 and red[2] < 60


def test_open_image_errors_name_the_file(tmp_path: Path):
    bad = tmp_path / "text.png"
    bad.write_text("no pixels here")
    with pytest.raises(ImageError, match=r"text\.png: not an image file"):
        open_image(bad)
    empty = tmp_path / "empty.jpg"
    empty.touch()
    with pytest.raises(ImageError, match=r"empty\.jpg: zero-byte file"):
        open_image(empty)
    with pytest.raises(ImageError, match=r"missing\.jpg: cannot read file"):
        open_image(tmp_path / "missing.jpg")


def test_cli_build_and_info(tree: Path, tmp_path: Path):
    runner = CliRunner()
    out = tmp_path / "m.parquet"
    result = runner.invoke(manifest_group, ["build", str(tree), "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "5 images, 2 classes" in result.output

    result = runner.invoke(manifest_group, ["info", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["num_images"] == 5


def test_cli_bad_tree_exits_with_message_not_traceback(tree: Path, tmp_path: Path):
    _zero_bytes(tree)
    result = CliRunner().invoke(manifest_group, ["build", str(tree), "--out", str(tmp_path / "m.parquet")])
    assert result.exit_code == 1
    assert "dog/empty.png: zero-byte file" in result.output and "--skip-bad" in result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)

    result = CliRunner().invoke(manifest_group, ["info", str(tmp_path / "absent.parquet")])
    assert result.exit_code == 1 and "does not exist" in result.output


def test_manifest_is_read_from_fsspec_urls(tmp_path):
    import fsspec

    from common.manifest import load_manifest, write_manifest

    rows = [ManifestRow("a/x.png", 0, 4, 3, 10, "0" * 64), ManifestRow("b/y.png", 1, 5, 6, 11, "1" * 64)]
    local = tmp_path / "m.parquet"
    digest = write_manifest(rows, ["a", "b"], tmp_path, local)
    with fsspec.open("memory://manifests/m.parquet", "wb") as f:
        f.write(local.read_bytes())
    for url in (f"file://{local}", "memory://manifests/m.parquet"):
        m = load_manifest(url)
        assert m.content_hash == digest and m.paths == ["a/x.png", "b/y.png"]
    with pytest.raises(ManifestError, match="does not exist"):
        load_manifest("memory://manifests/missing.parquet")
