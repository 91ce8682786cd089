"""common/cache_format.py: whole-shard writes, identity checks, damage detection, target restoration."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from common.cache_format import (
    CacheError,
    CacheReader,
    CacheWriter,
    verify_cache,
)
from common.cache_storage import index_dtype, restore_targets

N, C, K, CLASSES, PER_SHARD = 10, 3, 2, 5, 4  # 3 shards: 4 + 4 + 2 images


def attrs(**changes) -> dict:
    a = {
        "manifest": {"hash": "ab" * 32, "num_images": N},
        "num_classes": CLASSES,
        "teachers": [{"name": "t", "timm_name": "t", "weights": "file", "weights_sha256": "cd" * 32}],
        "ensemble": {"rule": "mean_softmax", "temperature": 1.0},
        "crops": {"num_crops": C, "seed": 0},
        "storage": {"k": K, "images_per_shard": PER_SHARD, "residual": "uniform"},
        "created_at": "now",
    }
    a.update(changes)
    return a


def shard_arrays(writer: CacheWriter, shard: int, seed: int = 0):
    """Deterministic, valid arrays for one shard: sorted top-k probabilities summing below 1."""
    start, stop = writer.shard_range(shard)
    rng = np.random.default_rng(seed + shard)
    n = stop - start
    probs = rng.dirichlet(np.ones(CLASSES), size=(n, C))
    index = np.argsort(-probs, axis=-1)[..., :K]
    prob = np.take_along_axis(probs, index, -1)
    boxes = rng.integers(0, 50, size=(n, C, 4))
    flip = rng.integers(0, 2, size=(n, C))
    return boxes, flip, index, prob


def build(path: Path, shards=(0, 1, 2)) -> CacheWriter:
    writer = CacheWriter(path, attrs())
    for s in shards:
        writer.write_shard(s, *shard_arrays(writer, s))
    return writer


def test_round_trip_and_gather(tmp_path):
    writer = build(tmp_path / "c")
    reader = CacheReader(tmp_path / "c", manifest_hash="ab" * 32, num_classes=CLASSES)
    assert reader.complete.all()
    boxes, flip, index, prob = shard_arrays(writer, 1)
    got = reader.gather([5, 4, 9], [2, 0, 1])
    assert np.array_equal(got["boxes"][0], boxes[1, 2]) and np.array_equal(got["flip"][1], flip[0, 0])
    assert np.array_equal(got["topk_index"][0], index[1, 2])
    np.testing.assert_allclose(got["topk_prob"][1], prob[0, 0], atol=1e-3)
    assert got["topk_index"].dtype == np.uint16 and got["topk_prob"].dtype == np.float16


def test_incomplete_shard_is_never_served(tmp_path):
    build(tmp_path / "c", shards=(0, 2))
    with pytest.raises(CacheError, match=r"1 of 3 shards are incomplete.*rerun"):
        CacheReader(tmp_path / "c")
    reader = CacheReader(tmp_path / "c", require_complete=False)
    assert reader.complete.tolist() == [True, False, True]
    with pytest.raises(CacheError, match="shard 1 is incomplete"):
        reader.gather([4], [0])
    assert verify_cache(tmp_path / "c") == ["shard 1 (images 4..7): incomplete (no completion record)"]


def test_reopening_with_same_identity_keeps_shards(tmp_path):
    build(tmp_path / "c", shards=(0,))
    again = CacheWriter(tmp_path / "c", attrs(created_at="later"))  # volatile keys may differ
    assert again.complete_shards().tolist() == [True, False, False]


@pytest.mark.parametrize(
    "change, key",
    [
        ({"manifest": {"hash": "ef" * 32, "num_images": N}}, "manifest"),
        ({"num_classes": 7}, "num_classes"),
        ({"crops": {"num_crops": C, "seed": 1}}, "crops"),
        ({"storage": {"k": 3, "images_per_shard": PER_SHARD, "residual": "uniform"}}, "storage"),
    ],
)
def test_other_identity_is_refused_naming_the_difference(tmp_path, change, key):
    build(tmp_path / "c", shards=(0,))
    with pytest.raises(CacheError, match="refusing to add") as err:
        CacheWriter(tmp_path / "c", attrs(**change))
    lines = [line for line in str(err.value).splitlines() if line.strip().startswith("- ")]
    assert len(lines) == 1 and lines[0].strip().startswith(f"- {key}:")


def test_reader_refuses_other_manifest_or_class_count(tmp_path):
    build(tmp_path / "c")
    with pytest.raises(CacheError, match="built for manifest"):
        CacheReader(tmp_path / "c", manifest_hash="00" * 32)
    with pytest.raises(CacheError, match="5 classes but 7"):
        CacheReader(tmp_path / "c", num_classes=7)


def test_newer_format_version_is_refused(tmp_path):
    build(tmp_path / "c")
    zarr.open_group(str(tmp_path / "c"), mode="r+").attrs["version"] = 99
    with pytest.raises(CacheError, match="newer than this tool"):
        CacheReader(tmp_path / "c")


def test_verify_catches_a_truncated_chunk_naming_the_shard(tmp_path):
    build(tmp_path / "c")
    chunk = tmp_path / "c" / "topk_prob" / "c" / "1" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
    problems = verify_cache(tmp_path / "c")
    assert len(problems) == 1 and problems[0].startswith("shard 1 array topk_prob"), problems
    with pytest.raises(CacheError, match="shard 1 .* is damaged"):
        CacheReader(tmp_path / "c").gather([4], [0])


def test_verify_catches_a_bit_flip_naming_the_shard(tmp_path):
    build(tmp_path / "c")
    chunk = tmp_path / "c" / "boxes" / "c" / "2" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x10
    chunk.write_bytes(bytes(data))
    problems = verify_cache(tmp_path / "c")
    assert len(problems) == 1 and problems[0].startswith("shard 2 array boxes"), problems


def test_verify_catches_data_rewritten_behind_the_record(tmp_path):
    build(tmp_path / "c")
    zarr.open_group(str(tmp_path / "c"), mode="r+")["topk_index"][0:1] = 4  # valid chunk, wrong content
    assert verify_cache(tmp_path / "c") == ["shard 0 array topk_index: checksum mismatch (file altered or damaged)"]


def test_cache_is_json_and_zstd_chunks_only(tmp_path):
    """Nothing in a cache is executable on open: JSON metadata and compressed numeric chunks."""
    build(tmp_path / "c")
    for f in (tmp_path / "c").rglob("*"):
        if f.name == "zarr.json":
            json.loads(f.read_text())
        elif f.is_file():
            assert "c" in f.relative_to(tmp_path / "c").parts, f
            assert f.read_bytes()[:4] == b"\x28\xb5\x2f\xfd", f"{f} is not a zstd frame"


def test_restore_targets_spreads_the_residual_uniformly():
    index = np.array([[3, 1], [0, 4]])
    prob = np.array([[0.6, 0.2], [0.5, 0.5]], dtype=np.float16)
    dense = restore_targets(index, prob, 5)
    torch.testing.assert_close(dense.sum(-1), torch.ones(2))
    torch.testing.assert_close(dense[0], torch.tensor([0.2 / 3, 0.2, 0.2 / 3, 0.6, 0.2 / 3]), atol=1e-3, rtol=0)
    assert dense[1, [1, 2, 3]].abs().max() < 1e-6  # kept mass 1: nothing left to spread
    full = restore_targets(np.array([[1, 0]]), np.array([[0.7, 0.29]], dtype=np.float16), 2)
    torch.testing.assert_close(full.sum(-1), torch.ones(1))
    assert full[0, 1] > full[0, 0]


def test_index_dtype_grows_past_uint16():
    assert index_dtype(65535) == np.uint16 and index_dtype(65536) == np.int32
