"""Manifest integrity against a hostile or careless editor (issue #26): width/height in the content
hash (old manifests still verify with their old hash), `--check-images`, duplicate paths and class
names, and one-line errors for malformed metadata, empty manifests and unwritable outputs."""
from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from common.cache_format import CacheWriter
from stage2_student_distill.app.cli import main
from common.manifest import ManifestError, ManifestRow, content_hash, load_manifest, write_manifest
from data_manifests.build import build_manifest

CLASSES = ["ant", "bee"]


def _png(path: Path, size: tuple[int, int], seed: int) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="PNG")


def _tree(root: Path, count: int = 8) -> Path:
    """``count`` PNGs of assorted sizes, dealt over two classes."""
    for i in range(count):
        _png(root / CLASSES[i % 2] / f"{i:03d}.png", (20 + i, 30 - i), seed=i)
    return root


@pytest.fixture
def built(tmp_path: Path):
    root = _tree(tmp_path / "images")
    out = tmp_path / "m.parquet"
    return out, build_manifest(root, out, progress=False)


def _one_line_error(result) -> str:
    """The CLI's output for an expected failure: exit 1, one line, no traceback."""
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), (result.output, result.exception)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0][len("Error: "):]


def _cli(*args: str):
    return CliRunner().invoke(main, list(args))


def _write_cache(path: Path, manifest_hash: str, num_images: int) -> Path:
    """A complete one-shard teacher cache tied to ``manifest_hash`` (no teacher needed)."""
    attrs = {
        "manifest": {"hash": manifest_hash, "num_images": num_images},
        "num_classes": len(CLASSES),
        "teachers": [{"name": "t", "timm_name": "t", "weights": "file", "weights_sha256": "cd" * 32}],
        "ensemble": {"rule": "mean_softmax", "temperature": 1.0},
        "crops": {"num_crops": 1, "seed": 0},
        "storage": {"k": 1, "images_per_shard": 16, "residual": "uniform"},
    }
    boxes = np.tile(np.array([0, 0, 8, 8], dtype=np.int32), (num_images, 1, 1))
    CacheWriter(path, attrs).write_shard(0, boxes, np.zeros((num_images, 1)), np.zeros((num_images, 1, 1)),
                                         np.full((num_images, 1, 1), 0.9))
    return path


def _rewrite(out: Path, table: pa.Table, **metadata) -> None:
    """Write ``table`` with its metadata, changing/adding ``metadata`` (None removes a key)."""
    meta = dict(table.schema.metadata)
    for key, value in metadata.items():
        if value is None:
            meta.pop(f"meal.{key}".encode(), None)
        else:
            meta[f"meal.{key}".encode()] = value if isinstance(value, bytes) else json.dumps(value).encode()
    pq.write_table(table.replace_schema_metadata(meta), out)


# -- 1. width and height belong to the content hash; old manifests keep their old hash


def _old_scheme_hash(class_names, paths, labels, digests) -> str:
    """The content hash as manifests written before hash schemes existed computed it (written out
    here from that encoding, not by calling the project's code)."""
    header = {"format": "meal-v2-manifest", "version": 1, "hash_algorithm": "sha256",
              "class_names": list(class_names), "num_images": len(paths)}
    h = hashlib.sha256(json.dumps(header, sort_keys=True, ensure_ascii=False).encode("utf-8"))
    h.update(np.arange(len(paths), dtype="<i8").tobytes() + np.asarray(labels, dtype="<i4").tobytes())
    h.update("\0".join(paths).encode("utf-8") + "".join(digests).encode("ascii"))
    return h.hexdigest()


def _old_manifest(root: Path, out: Path) -> str:
    """An old-scheme manifest of the images under ``root`` (no meal.hash_scheme key); returns its hash."""
    files = sorted(p for p in root.rglob("*.png"))
    paths = [p.relative_to(root).as_posix() for p in files]
    labels = [CLASSES.index(p.split("/")[0]) for p in paths]
    digests = [hashlib.sha256(p.read_bytes()).hexdigest() for p in files]
    sizes = [Image.open(p).size for p in files]
    digest = _old_scheme_hash(CLASSES, paths, labels, digests)
    table = pa.table({
        "image_id": pa.array(range(len(paths)), pa.int64()), "path": pa.array(paths, pa.string()),
        "label": pa.array(labels, pa.int32()), "width": pa.array([w for w, _ in sizes], pa.int32()),
        "height": pa.array([h for _, h in sizes], pa.int32()),
        "bytes": pa.array([p.stat().st_size for p in files], pa.int64()), "sha256": pa.array(digests, pa.string()),
    })
    metadata = {"format": "meal-v2-manifest", "version": 1, "class_names": CLASSES, "root": str(root),
                "description": "", "hash_algorithm": "sha256", "content_hash": digest}
    pq.write_table(table.replace_schema_metadata(
        {f"meal.{k}".encode(): json.dumps(v).encode() for k, v in metadata.items()}), out)
    return digest


def test_an_old_scheme_manifest_loads_with_its_hash_and_still_matches_its_cache(tmp_path: Path):
    root = _tree(tmp_path / "images")
    old = tmp_path / "old.parquet"
    old_hash = _old_manifest(root, old)
    manifest = load_manifest(old)
    assert manifest.content_hash == old_hash and manifest.hash_scheme == 1 and manifest.num_images == 8
    cache = _write_cache(tmp_path / "cache", old_hash, 8)
    ok = _cli("cache", "verify", str(cache), "--manifest", str(old), "--check-images")
    assert ok.exit_code == 0 and ok.output.startswith("OK:") and "all 8 images match" in ok.output, ok.output

    # The same images built now: a new identity that covers width and height.
    new = build_manifest(root, tmp_path / "new.parquet", progress=False)
    assert new.hash_scheme == 2 and new.content_hash != old_hash
    assert new.paths == manifest.paths and new.widths.tolist() == manifest.widths.tolist()


@pytest.mark.parametrize("column", ["width", "height"])
def test_editing_width_or_height_of_a_new_manifest_is_refused_as_edited(built, column):
    out, manifest = built
    table = pq.read_table(out)
    values = table.column(column).to_numpy().copy()
    values[3] += 7  # stage 1 would draw this image's boxes in a frame 7 px too large
    edited = table.set_column(table.schema.get_field_index(column), column, pa.array(values, pa.int32()))
    pq.write_table(edited.replace_schema_metadata(table.schema.metadata), out)
    line = _one_line_error(_cli("manifest", "info", str(out)))
    assert f"manifest {out} was edited after it was built" in line and "pipeline manifest build" in line


def test_downgrading_an_edited_manifest_to_the_old_scheme_changes_its_identity(built, tmp_path: Path):
    """Dropping meal.hash_scheme and re-hashing with the old scheme lets an edited width load, but
    as another dataset: the cache built from the original refuses it."""
    out, manifest = built
    cache = _write_cache(tmp_path / "cache", manifest.content_hash, manifest.num_images)
    table = pq.read_table(out)
    widths = table.column("width").to_numpy().copy()
    widths[0] += 5
    edited = table.set_column(table.schema.get_field_index("width"), "width", pa.array(widths, pa.int32()))
    forged = _old_scheme_hash(CLASSES, manifest.paths, manifest.labels, table.column("sha256").to_pylist())
    _rewrite(out, edited, hash_scheme=None, content_hash=forged)
    assert load_manifest(out).content_hash == forged != manifest.content_hash
    refused = _cli("cache", "verify", str(cache), "--manifest", str(out))
    assert refused.exit_code == 1 and f"built for manifest {manifest.content_hash[:16]}" in refused.output


def test_a_hash_scheme_from_a_newer_tool_asks_for_an_upgrade(built):
    out, _ = built
    _rewrite(out, pq.read_table(out), hash_scheme=3)
    line = _one_line_error(_cli("manifest", "info", str(out)))
    assert "content hash scheme 3" in line and "upgrade the tool" in line


# -- 2. --check-images: every file's digest against the manifest's


def _replace_same_size(manifest, image_id: int, seed: int) -> None:
    path = manifest.root / manifest.paths[image_id]
    _png(path, (int(manifest.widths[image_id]), int(manifest.heights[image_id])), seed=1000 + seed)


def test_cache_verify_check_images_names_replaced_files_and_counts_the_rest(built, tmp_path: Path):
    out, manifest = built
    cache = _write_cache(tmp_path / "cache", manifest.content_hash, manifest.num_images)
    ok = _cli("cache", "verify", str(cache), "--manifest", str(out), "--check-images")
    assert ok.exit_code == 0 and "all 8 images match" in ok.output, ok.output
    plain = _cli("cache", "verify", str(cache), "--manifest", str(out))

    replaced = [1, 2, 4, 5, 6, 7, 0]  # same width and height: only the digest tells
    for i in replaced:
        _replace_same_size(manifest, i, seed=i)
    assert plain.exit_code == 0 and _cli("cache", "verify", str(cache), "--manifest", str(out)).exit_code == 0
    line = _one_line_error(_cli("cache", "verify", str(cache), "--manifest", str(out), "--check-images"))
    assert line.startswith(f"7 of 8 image file(s) under {manifest.root} differ from manifest {out}: ")
    named = [p for p in manifest.paths if f"{p} (sha256 differs)" in line]
    assert len(named) == 5 and "and 2 more" in line
    assert manifest.paths[3] not in line  # the untouched file
    assert "restore the original files" in line and "pipeline manifest build" in line


def test_check_images_refuses_a_missing_file_and_a_symlink_out_of_the_root(built, tmp_path: Path):
    out, manifest = built
    cache = _write_cache(tmp_path / "cache", manifest.content_hash, manifest.num_images)
    (manifest.root / manifest.paths[2]).unlink()
    target = manifest.root / manifest.paths[5]
    outside = tmp_path / "outside.png"
    outside.write_bytes(target.read_bytes())  # the very same bytes, but outside the root
    target.unlink()
    target.symlink_to(outside)
    line = _one_line_error(_cli("cache", "verify", str(cache), "--manifest", str(out), "--check-images"))
    assert line.startswith("2 of 8 image file(s)")
    assert f"{manifest.paths[2]} (cannot read: No such file or directory)" in line
    assert f"{manifest.paths[5]} (resolves to {outside.resolve()}, outside the data root" in line


def test_check_images_needs_a_manifest(built, tmp_path: Path):
    out, manifest = built
    cache = _write_cache(tmp_path / "cache", manifest.content_hash, manifest.num_images)
    result = _cli("cache", "verify", str(cache), "--check-images")
    assert result.exit_code == 2 and "give --manifest M" in result.output


def _distill_args(tmp_path: Path, train: Path, val: Path, cache: Path, *extra: str, epochs: int = 1) -> list[str]:
    return ["--set", "runtime.device=cpu", "--set", "runtime.progress=false", "distill", "--manifest", str(train),
            "--val-manifest", str(val), "--cache", str(cache), "--out", str(tmp_path / "run"), "--student",
            "test_resnet", "--img-size", "16", "--epochs", str(epochs), "--batch-size", "4", "--eval-batch-size",
            "4", "--loader", "torch", "--num-workers", "0", *extra]


def test_distill_check_images_stops_before_training_naming_the_replaced_file(built, tmp_path: Path):
    train, manifest = built
    val = tmp_path / "val.parquet"
    val_manifest = build_manifest(_tree(tmp_path / "val-images", count=4), val, progress=False)
    cache = _write_cache(tmp_path / "cache", manifest.content_hash, manifest.num_images)
    _replace_same_size(val_manifest, 2, seed=7)
    line = _one_line_error(_cli(*_distill_args(tmp_path, train, val, cache, "--check-images")))
    assert line.startswith(f"1 of 4 image file(s) under {val_manifest.root} differ from manifest {val}: "
                           f"{val_manifest.paths[2]} (sha256 differs)"), line
    assert not (tmp_path / "run" / "last.pt").exists()


# -- 3. duplicate paths and class names


def test_write_refuses_duplicate_paths_and_class_names(tmp_path: Path):
    row = ManifestRow("a/x.png", 0, 4, 4, 1, "0" * 64)
    with pytest.raises(ManifestError, match=r"path 'a/x.png' appears twice"):
        write_manifest([row, row], ["a"], tmp_path, tmp_path / "m.parquet")
    with pytest.raises(ManifestError, match=r"class name 'a' appears twice"):
        write_manifest([row], ["a", "b", "a"], tmp_path, tmp_path / "m.parquet")
    assert not (tmp_path / "m.parquet").exists()


def test_load_refuses_a_duplicate_path_even_with_a_valid_hash(built):
    out, manifest = built
    table = pq.read_table(out)
    paths = table.column("path").to_pylist()
    paths[6] = paths[1]
    forged = table.set_column(table.schema.get_field_index("path"), "path", pa.array(paths, pa.string()))
    _rewrite(out, forged, content_hash=content_hash(forged))
    line = _one_line_error(_cli("manifest", "info", str(out)))
    assert f"path {paths[1]!r} appears more than once (images [1, 6])" in line and "pipeline manifest build" in line


def test_load_refuses_a_duplicate_class_name_even_with_a_valid_hash(built):
    out, _ = built
    table = pq.read_table(out)
    _rewrite(out, table, class_names=["ant", "ant"])
    table = pq.read_table(out)
    _rewrite(out, table, content_hash=content_hash(table))
    line = _one_line_error(_cli("manifest", "info", str(out)))
    assert "class name 'ant' appears twice in meal.class_names" in line


# -- 4. malformed metadata, empty manifests and unwritable outputs: one line each


@pytest.mark.parametrize("value, expected", [
    (b"5", "metadata meal.root must be a JSON string (the image folder), not 5"),
    (b"[" * 200_000 + b"]" * 200_000, "metadata meal.root is nested too deeply"),
    (b"{not json", "metadata meal.root is not valid JSON"),
])
def test_a_malformed_root_is_one_line_naming_the_key(built, value, expected):
    out, _ = built
    _rewrite(out, pq.read_table(out), root=value)
    line = _one_line_error(_cli("manifest", "info", str(out)))
    assert str(out) in line and expected in line and "pipeline manifest build" in line
    assert len(line) < 400  # the hostile value is not echoed whole


def test_a_zero_row_manifest_says_it_lists_no_images(built, tmp_path: Path):
    out, _ = built
    table = pq.read_table(out)
    empty = table.slice(0, 0)
    _rewrite(out, empty, content_hash=_old_scheme_hash(CLASSES, [], [], []), hash_scheme=None)
    line = _one_line_error(_cli("manifest", "info", str(out)))
    assert line.startswith(f"manifest {out} lists no images (0 rows)")
    cache_args = ["--set", "runtime.device=cpu", "teacher-cache", "--teachers", "test_resnet", "--manifest", str(out),
                  "--out", str(tmp_path / "cache"), "--no-pretrained"]
    assert _one_line_error(_cli(*cache_args)).startswith(f"manifest {out} lists no images")
    with pytest.raises(ManifestError, match="a manifest needs at least one image"):
        write_manifest([], CLASSES, tmp_path, tmp_path / "w.parquet")


def test_building_over_an_empty_tree_says_so(tmp_path: Path):
    (tmp_path / "bare").mkdir()
    line = _one_line_error(_cli("manifest", "build", str(tmp_path / "bare"), "--out", str(tmp_path / "m.parquet")))
    assert "has no class folders" in line
    (tmp_path / "empty" / "ant").mkdir(parents=True)
    line = _one_line_error(_cli("manifest", "build", str(tmp_path / "empty"), "--out", str(tmp_path / "m.parquet"),
                                "--skip-bad", "--no-progress"))
    assert line.startswith(f"no valid images under {tmp_path / 'empty'}")


def test_build_refuses_an_out_it_cannot_write_before_reading_images(tmp_path: Path, monkeypatch):
    root = _tree(tmp_path / "images", count=2)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    line = _one_line_error(_cli("manifest", "build", str(root), "--out", str(blocker / "sub" / "m.parquet")))
    assert f"cannot write manifest {blocker / 'sub' / 'm.parquet'}: {blocker} is a file, not a folder" in line
    line = _one_line_error(_cli("manifest", "build", str(root), "--out", str(tmp_path)))
    assert f"--out {tmp_path} is a folder" in line

    # A read-only filesystem: the kernel's answer, as os.access gives it there (even to root).
    import data_manifests.build as build_module

    real_access = os.access
    monkeypatch.setattr(build_module.os, "access",
                        lambda p, mode, **kw: False if Path(p) == tmp_path / "ro" else real_access(p, mode, **kw))
    (tmp_path / "ro").mkdir()
    decoded = []
    monkeypatch.setattr(build_module, "decoded_size", lambda *a: decoded.append(a))
    line = _one_line_error(_cli("manifest", "build", str(root), "--out", str(tmp_path / "ro" / "m.parquet")))
    assert "no permission to write in" in line and "read-only filesystem" in line and "choose an --out" in line
    assert decoded == []  # refused before any image was read


def test_a_write_that_fails_anyway_is_one_line(tmp_path: Path, monkeypatch):
    """The folder looked writable but the write fails (read-only remount, disk full)."""
    import common.atomic

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(common.atomic.tempfile, "mkstemp", read_only)
    root = _tree(tmp_path / "images", count=2)
    out = tmp_path / "m.parquet"
    line = _one_line_error(_cli("manifest", "build", str(root), "--out", str(out), "--no-progress"))
    assert line.startswith(f"cannot write manifest {out} (Read-only file system)") and "a folder you can write" in line
    assert not out.exists()


def test_distill_check_images_passes_on_intact_files_and_may_be_dropped_on_resume(built, tmp_path: Path):
    train, manifest = built
    val = tmp_path / "val.parquet"
    build_manifest(_tree(tmp_path / "val-images", count=4), val, progress=False)
    cache = _write_cache(tmp_path / "cache", manifest.content_hash, manifest.num_images)
    first = _cli(*_distill_args(tmp_path, train, val, cache, "--check-images", "--schedule", "step"))
    assert first.exit_code == 0 and "done: best val top-1" in first.output, first.output
    assert json.loads((tmp_path / "run" / "config.json").read_text())["distill"]["check_images"] is True
    # a check before training, not part of it: resuming without it is the same run
    resumed = _cli(*_distill_args(tmp_path, train, val, cache, "--schedule", "step", "--resume", epochs=2))
    assert resumed.exit_code == 0 and "done: best val top-1" in resumed.output, resumed.output
