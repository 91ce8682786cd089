"""`teacher-cache --more-crops N`: a grown cache is the cache built with C+N crops from scratch.

The reference is an independent from-scratch run with C+N crops (its arrays, not our own grown
output, are what the grown cache must equal); growing is refused on other inputs; a grow killed
mid-way, in the shard loop or in the final swap, is refused by readers and resumes to the same
result; stage 2 trains on a grown cache exactly as on the from-scratch one.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from common.cache_format import CacheError, CacheReader, verify_cache
from stage2_student_distill.app.cli import main
from stage1_fixtures import INPUT_SIZES, TEACHERS, config, dataset, kill_inside_shard_1, overrides  # noqa: F401
from stage1_teacher_cache import grow
from stage1_teacher_cache.run import run

ARRAYS = ("boxes", "flip", "topk_index", "topk_prob", "shard_record")
# Provenance: when and by which command; everything else must equal the from-scratch cache's.
PROVENANCE = ("created_at", "config", "grown")


def cli_args(cache: Path, manifest: Path, *extra: str) -> list[str]:
    args = ["--set", "runtime.progress=false", "--set", "runtime.device=cpu", "teacher-cache",
            "--teachers", ",".join(TEACHERS), "--manifest", str(manifest), "--out", str(cache),
            "--topk", "2", "--batch-size", "7", "--images-per-shard", "4", "--loader", "torch", "--no-pretrained"]
    for size in INPUT_SIZES:
        args += ["--input-size", size]
    return args + list(extra)


def arrays(path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(path), mode="r")
    return {name: np.asarray(group[name][:]) for name in ARRAYS}


def assert_same_cache(grown: Path, scratch: Path) -> None:
    a, b = arrays(grown), arrays(scratch)
    for name in ARRAYS:
        assert a[name].shape == b[name].shape and np.array_equal(a[name], b[name]), name
    ga, gb = zarr.open_group(str(grown), mode="r"), zarr.open_group(str(scratch), mode="r")
    for name in ARRAYS:  # same chunking along the crop axis: one chunk per shard, as from scratch
        assert ga[name].chunks == gb[name].chunks, name
    attrs_a = {k: v for k, v in ga.attrs.asdict().items() if k not in PROVENANCE}
    attrs_b = {k: v for k, v in gb.attrs.asdict().items() if k not in PROVENANCE}
    assert attrs_a == attrs_b
    assert verify_cache(grown) == []
    assert sorted(p.name for p in grown.iterdir()) == sorted(p.name for p in scratch.iterdir())  # no staging left


@pytest.fixture(scope="module")
def caches(dataset):  # noqa: F811
    """A complete 2-crop cache (to copy and grow) and the 4-crop cache built from scratch."""
    tmp = dataset["tmp"]
    small, scratch = tmp / "grow-small", tmp / "grow-scratch"
    run(config(dataset["train"], small, **{"crops.num_crops": 2}))
    run(config(dataset["train"], scratch, **{"crops.num_crops": 4}))
    return {"small": small, "scratch": scratch}


def test_cli_grown_cache_equals_the_from_scratch_one(dataset, caches, tmp_path):  # noqa: F811
    cache = shutil.copytree(caches["small"], tmp_path / "cache")
    runner = CliRunner()
    args = cli_args(cache, dataset["train"], "--num-crops", "2", "--more-crops", "2")
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "grown from 2 to 4 crops per image" in result.output
    assert_same_cache(cache, caches["scratch"])

    ok = runner.invoke(main, ["cache", "verify", str(cache), "--manifest", str(dataset["train"])])
    assert ok.exit_code == 0 and ok.output.startswith("OK:"), ok.output
    info = runner.invoke(main, ["cache", "info", str(cache)])
    assert info.exit_code == 0, info.output
    assert "crops         4 per image" in info.output and "grown         from 2 to 4 crops per image" in info.output
    grown = json.loads(runner.invoke(main, ["cache", "info", str(cache), "--json"]).output)["grown"]
    assert [(g["from_crops"], g["to_crops"]) for g in grown] == [(2, 4)] and grown[0]["config"]

    # The target is absolute (C from --num-crops, plus N): the same command again adds nothing.
    again = runner.invoke(main, args)
    assert again.exit_code == 0 and "already has 4 crops" in again.output and "wrote 0 shard(s)" in again.output
    assert_same_cache(cache, caches["scratch"])
    # A second growth continues the crop indices: 4 -> 5 equals 5 from scratch (crops 0..3 kept, crop 4 new).
    assert runner.invoke(main, cli_args(cache, dataset["train"], "--num-crops", "4", "--more-crops", "1")).exit_code == 0
    five = tmp_path / "five"
    run(config(dataset["train"], five, **{"crops.num_crops": 5}))
    a, b = arrays(cache), arrays(five)
    assert all(np.array_equal(a[n], b[n]) for n in ARRAYS)
    assert [g["to_crops"] for g in CacheReader(cache).attrs["grown"]] == [4, 5]


@pytest.mark.parametrize(
    "change, named",
    [
        ({"data.manifest": "val"}, ("manifest: cache has", "'num_images': 6")),
        ({"teacher_cache.teachers": ["test_resnet"], "teacher_cache.input_sizes": [INPUT_SIZES[0]]},
         ("teachers: cache has",)),
        ({"crops.seed": 1}, ("crops: cache has", "'seed': 1")),
        ({"crops.scale": (0.5, 1.0)}, ("crops: cache has", "'scale': [0.5, 1.0]")),
        ({"teacher_cache.topk": 3}, ("storage: cache has", "'k': 3")),
    ],
    ids=["manifest", "teachers", "crop-seed", "crop-scale", "topk"],
)
def test_growing_with_other_inputs_is_refused(dataset, caches, tmp_path, change, named):  # noqa: F811
    cache = shutil.copytree(caches["small"], tmp_path / "cache")
    change = {k: str(dataset["val"]) if v == "val" else v for k, v in change.items()}
    cfg = config(dataset["train"], cache, **{"crops.num_crops": 2}).replace(**change)
    with pytest.raises(CacheError, match="refusing to grow") as err:
        run(cfg, more_crops=2)
    message = str(err.value)
    assert all(part in message for part in named) and message.count("cache has") == 1, message
    assert "growing" not in CacheReader(cache).attrs and not (cache / grow.STAGING).exists()
    assert all(np.array_equal(a, b) for a, b in zip(arrays(cache).values(), arrays(caches["small"]).values()))


def test_growing_from_another_crop_count_or_an_incomplete_cache_is_refused(dataset, caches, tmp_path):  # noqa: F811
    cache = shutil.copytree(caches["small"], tmp_path / "cache")
    with pytest.raises(CacheError, match="has 2 crops per image.*pass --num-crops 2"):
        run(config(dataset["train"], cache, **{"crops.num_crops": 3}), more_crops=1)
    records = zarr.open_group(str(cache), mode="r+")["shard_record"]
    records[1:2] = np.zeros((1, 5), np.uint32)  # what `cache verify --repair` leaves
    with pytest.raises(CacheError, match="incomplete"):
        run(config(dataset["train"], cache, **{"crops.num_crops": 2}), more_crops=2)
    with pytest.raises(CacheError, match="no cache to grow"):
        run(config(dataset["train"], tmp_path / "absent", **{"crops.num_crops": 2}), more_crops=2)


def test_a_cache_whose_boxes_are_not_the_seeds_is_refused(dataset, caches, tmp_path):  # noqa: F811
    """Boxes written by someone else, with consistent records (so `verify` passes): new crops drawn from
    the seed would not continue them."""
    from common.cache_format import _checksum

    cache = shutil.copytree(caches["small"], tmp_path / "cache")
    group = zarr.open_group(str(cache), mode="r+")
    boxes = np.asarray(group["boxes"][4:8])
    boxes[1, 0, 0] = 0 if boxes[1, 0, 0] else 1  # crop 0 of image 5 moved by a pixel
    boxes[1, 0, 2] = 1  # ...and 1 pixel wide, so it still lies inside its image
    group["boxes"][4:8] = boxes
    record = np.asarray(group["shard_record"][1:2])
    record[0, 1] = _checksum(boxes)
    group["shard_record"][1:2] = record
    assert verify_cache(cache) == []
    with pytest.raises(CacheError, match="stored crops of shard 1 are not the ones its crops.seed draws"):
        run(config(dataset["train"], cache, **{"crops.num_crops": 2}), more_crops=1)
    assert "growing" not in CacheReader(cache).attrs


def test_grow_killed_mid_shard_is_refused_then_resumes_to_the_same_cache(dataset, caches, tmp_path):  # noqa: F811
    cache, flag = shutil.copytree(caches["small"], tmp_path / "cache"), tmp_path / "in-shard-1"
    settings = overrides(dataset["train"], cache, **{"crops.num_crops": 2})
    kill_inside_shard_1(settings, flag, tmp_path, "shard 1 of the grow", writer_path_end="/grow", more_crops=2)
    # Mid-grow: not readable as the old cache nor as the grown one, and verify says why.
    with pytest.raises(CacheError, match="being grown from 2 to 4 crops.*--more-crops 2"):
        CacheReader(cache)
    assert any("being grown" in p for p in verify_cache(cache))
    info = CliRunner().invoke(main, ["cache", "info", str(cache)])
    assert info.exit_code == 0 and "GROWING       from 2 to 4 crops per image (computing, 1/3 shards)" in info.output
    staged = CacheReader(cache / grow.STAGING, require_complete=False)
    assert staged.complete.tolist() == [True, False, False]
    # Another growth target, or a plain stage-1 resume, is refused while this one is unfinished.
    with pytest.raises(CacheError, match="being grown from 2 to 4"):
        run(config(dataset["train"], cache, **{"crops.num_crops": 2}), more_crops=3)
    with pytest.raises(CacheError, match="being grown from 2 to 4"):
        run(config(dataset["train"], cache, **{"crops.num_crops": 2}))

    # Abandoning (on a copy) gives back the untouched 2-crop cache.
    dropped = shutil.copytree(cache, tmp_path / "dropped")
    out = CliRunner().invoke(main, ["cache", "abandon-growth", str(dropped)])
    assert out.exit_code == 0 and "it is the 2-crop cache again" in out.output, out.output
    assert_same_cache(dropped, caches["small"])

    summary = run(config(dataset["train"], cache, **{"crops.num_crops": 2}), more_crops=2)
    assert summary["shards_written"] == 2 and summary["shards_skipped"] == 1 and summary["grown"]["now"]
    assert_same_cache(cache, caches["scratch"])
    refused = CliRunner().invoke(main, ["cache", "abandon-growth", str(cache)])
    assert refused.exit_code == 1 and "is not being grown" in refused.output


def test_grow_killed_while_swapping_arrays_resumes(dataset, caches, tmp_path, monkeypatch):  # noqa: F811
    """A failure after some arrays were moved in: the shapes disagree with the attributes, so
    readers must refuse (they do: the marker), and a rerun only finishes the swap."""
    cache = shutil.copytree(caches["small"], tmp_path / "cache")
    move, moved = grow._move_array, []

    def move_two_then_die(path, name):
        if len(moved) == 2:
            raise KeyboardInterrupt("killed while swapping")
        move(path, name)
        moved.append(name)

    monkeypatch.setattr(grow, "_move_array", move_two_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(config(dataset["train"], cache, **{"crops.num_crops": 2}), more_crops=2)
    monkeypatch.setattr(grow, "_move_array", move)
    assert zarr.open_group(str(cache), mode="r")["boxes"].shape == (9, 4, 4)  # half swapped
    with pytest.raises(CacheError, match="being grown"):
        CacheReader(cache)
    with pytest.raises(CacheError, match="already swapping"):
        grow.abandon(str(cache))
    info = CliRunner().invoke(main, ["cache", "info", str(cache)])
    assert info.exit_code == 1 and "is being grown from 2 to 4" in info.output, info.output
    summary = run(config(dataset["train"], cache, **{"crops.num_crops": 2}), more_crops=2)
    assert summary["shards_written"] == 0
    assert_same_cache(cache, caches["scratch"])


def test_grow_on_an_fsspec_url(dataset, caches):  # noqa: F811
    """Object stores have no directory rename: the swap copies, then deletes (memory:// here)."""
    import fsspec

    fs = fsspec.filesystem("memory")
    url = "memory://grow-test/cache"
    fs.put(str(caches["small"]), "/grow-test/cache", recursive=True)
    run(config(dataset["train"], url, **{"crops.num_crops": 2}), more_crops=2)
    grown, scratch = CacheReader(url), CacheReader(caches["scratch"])
    for name in ARRAYS[:4]:
        assert np.array_equal(np.asarray(grown.arrays[name][:]), np.asarray(scratch.arrays[name][:])), name
    assert verify_cache(url) == [] and not fs.exists(f"/grow-test/cache/{grow.STAGING}")
    fs.rm("/grow-test", recursive=True)


def test_distill_on_a_grown_cache_equals_distill_on_the_from_scratch_one(dataset, caches, tmp_path):  # noqa: F811
    from common.config import load_config
    from stage2_student_distill.train import run_distill

    cache = shutil.copytree(caches["small"], tmp_path / "cache")
    run(config(dataset["train"], cache, **{"crops.num_crops": 2}), more_crops=2)

    def distill(source: Path, out: Path):
        return load_config(None, {
            "runtime.device": "cpu", "runtime.progress": False, "runtime.num_workers": 1, "runtime.seed": 0,
            "data.manifest": str(dataset["train"]), "data.val_manifest": str(dataset["val"]),
            "optim.epochs": 2, "optim.batch_size": 4, "optim.eval_batch_size": 8, "optim.img_size": 32,
            "optim.loader": "torch", "optim.log_every": 1, "distill.student": "test_resnet",
            "distill.cache": str(source), "distill.out": str(out), "distill.crops_per_image": 2})

    grown, scratch = run_distill(distill(cache, tmp_path / "a")), run_distill(distill(caches["scratch"], tmp_path / "b"))
    lines = [[{k: v for k, v in json.loads(line).items() if "time" not in k and not k.endswith("_s")}
              for line in (out / "metrics.jsonl").read_text().splitlines()] for out in (tmp_path / "a", tmp_path / "b")]
    assert lines[0] == lines[1] and len(lines[0]) >= 2
    assert grown is not None and scratch is not None
