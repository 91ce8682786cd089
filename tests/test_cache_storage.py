"""common/cache_storage.py: the storage rules and the one builder of cache attributes.

Every command that writes a cache builds its attributes with ``cache_attrs``; these tests hold
what each must write, through the CLI: stage 1, merge, subset, reduce and grow record the same
``storage`` block, identity first, and a cache made from another keeps the source's attributes
except the ones the command names (label_agreement is never copied).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from common.cache_format import CacheReader, put_attrs
from common.cache_storage import cache_attrs, index_dtype, storage_attrs
from stage2_student_distill.app.cli import main
from stage1_fixtures import INPUT_SIZES, TEACHERS, dataset  # noqa: F401

IDENTITY_FIRST = ["manifest", "num_classes", "teachers", "ensemble", "crops", "storage"]


def cli(*args: str) -> str:
    result = CliRunner().invoke(main, ["--set", "runtime.progress=false", "--set", "runtime.device=cpu", *args])
    assert result.exit_code == 0, result.output
    return result.output


def teacher_cache(manifest: Path, out: Path, teacher: int, *extra: str) -> str:
    return cli("teacher-cache", "--teachers", TEACHERS[teacher], "--input-size", INPUT_SIZES[teacher],
               "--manifest", str(manifest), "--out", str(out), "--topk", "2", "--batch-size", "7",
               "--images-per-shard", "4", "--num-crops", "2", "--loader", "torch", "--no-pretrained", *extra)


def attrs_of(path: Path) -> dict:
    return json.loads((path / "zarr.json").read_text())["attributes"]


def storage(k: int) -> dict:
    """What the docs (docs/cache-format.md) promise for 3 classes and shards of 4 images."""
    return {"k": k, "images_per_shard": 4, "residual": "uniform", "index_dtype": "uint16", "prob_dtype": "float16"}


@pytest.fixture(scope="module")
def caches(dataset):  # noqa: F811
    """A and B: one teacher each on the same crops (so they merge); every derived cache of them."""
    tmp, train = dataset["tmp"], dataset["train"]
    a, b = tmp / "store-A", tmp / "store-B"
    teacher_cache(train, a, 0)
    teacher_cache(train, b, 1, "--reuse-crops", str(a))
    cli("cache", "merge", str(a), str(b), "--out", str(tmp / "store-M"), "--topk", "1")
    cli("cache", "subset", str(a), "--out", str(tmp / "store-S"), "--manifest", str(train),
        "--subset-manifest-out", str(tmp / "store-S.parquet"), "--classes", "ant,cat")
    cli("cache", "reduce", str(a), "--out", str(tmp / "store-R"), "--topk", "1")  # no --manifest: no agreement
    grown = shutil.copytree(a, tmp / "store-G")
    teacher_cache(train, grown, 0, "--more-crops", "1")
    return {name: tmp / f"store-{name}" for name in "ABMSRG"} | {"train": train}


def test_every_command_records_the_storage_rules_identity_first(caches):
    for name, k in {"A": 2, "B": 2, "M": 1, "S": 2, "R": 1, "G": 2}.items():
        attrs = attrs_of(caches[name])
        assert list(attrs)[:6] == IDENTITY_FIRST, name
        assert attrs["storage"] == storage(k), name
        assert CacheReader(caches[name]).topk == k  # and the arrays agree with it


def test_subset_and_reduce_keep_every_source_attribute_but_the_named_ones(caches):
    source = attrs_of(caches["A"])
    assert "label_agreement" in source  # stage 1 recorded it: the derived caches must not copy it

    reduced = attrs_of(caches["R"])
    expected = {key: value for key, value in source.items() if key != "label_agreement"}
    expected.update(storage=storage(1), reduced={"source": str(caches["A"]), "source_k": 2, "k": 1},
                    created_at=reduced["created_at"])
    assert reduced == expected and list(reduced) == list(expected)  # same keys in the same order
    assert reduced["created_at"] >= source["created_at"]  # stamped when reduced (ISO times sort)

    subset = attrs_of(caches["S"])
    changed = {"manifest", "manifest_path", "subset", "created_at", "label_agreement"}  # the latter recomputed
    assert {key: value for key, value in subset.items() if key not in changed} == \
        {key: value for key, value in source.items() if key not in changed}
    assert list(subset) == [key for key in source if key != "label_agreement"] + ["subset", "label_agreement"]
    assert subset["subset"]["source_manifest"] == source["manifest"]
    assert subset["manifest"]["num_images"] == subset["subset"]["num_images"] == 6  # ant and cat: 3 + 3 of 9
    assert subset["label_agreement"]["labelled_images"] == 6  # recomputed on the subset, not the source's 9


def test_merge_builds_identity_from_the_sources_and_describes_them(caches):
    a, b, merged = attrs_of(caches["A"]), attrs_of(caches["B"]), attrs_of(caches["M"])
    for key in ("manifest", "num_classes", "ensemble", "crops", "manifest_path", "class_names"):
        assert merged[key] == a[key], key
    assert merged["teachers"] == a["teachers"] + b["teachers"]
    assert merged["teacher_eval"] is None and "label_agreement" not in merged and "config" not in merged
    assert [s["teachers"] for s in merged["merge"]["sources"]] == [[TEACHERS[0]], [TEACHERS[1]]]


def test_a_grown_cache_keeps_its_creation_time_and_the_other_attributes(caches):
    source, grown = attrs_of(caches["A"]), attrs_of(caches["G"])
    assert grown["crops"] == dict(source["crops"], num_crops=3)
    assert grown["created_at"] == source["created_at"]  # when the cache was made, not grown
    assert [(g["from_crops"], g["to_crops"]) for g in grown["grown"]] == [(2, 3)]
    provenance = {"crops", "grown", "label_agreement"}  # label_agreement: recomputed over the 3 crops
    assert {key: value for key, value in grown.items() if key not in provenance} == \
        {key: value for key, value in source.items() if key not in provenance}
    assert list(grown) == [key for key in source if key != "label_agreement"] + ["grown", "label_agreement"]


@pytest.mark.parametrize("command", ["reduce", "merge"])
def test_a_source_with_another_residual_rule_is_refused_in_one_line(caches, tmp_path, command):
    other = shutil.copytree(caches["A"], tmp_path / "other-rule")
    put_attrs(other, dict(attrs_of(other), storage=dict(storage(2), residual="tail")))
    args = ([str(other), "--topk", "1"] if command == "reduce" else [str(other), str(caches["B"])])
    result = CliRunner().invoke(main, ["cache", command, *args, "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"Error: {other}: residual rule 'tail'; {command} knows only the 'uniform' rule"], result.output
    assert not (tmp_path / "out").exists()


def test_builder_needs_the_identity_and_derives_the_storage_block():
    identity = {"manifest": {"hash": "h", "num_images": 2}, "num_classes": 70_000, "teachers": [{"name": "t"}],
                "ensemble": {"rule": "mean_softmax", "temperature": 1.0},
                "crops": {"num_crops": 4, "scale": (0.08, 1.0)}}
    fresh = cache_attrs(**identity, k=5, images_per_shard=8, note="x")
    assert list(fresh) == [*IDENTITY_FIRST, "note", "created_at"]
    assert fresh["storage"]["index_dtype"] == "int32"  # past 65,535 classes uint16 cannot hold an index
    assert fresh["crops"]["scale"] == [0.08, 1.0]  # as JSON reads it back: the writer compares like with like
    derived = cache_attrs(dict(fresh, label_agreement={}, growing={}), num_crops=6, k=3, stamp_created=False)
    assert derived["created_at"] == fresh["created_at"] and "label_agreement" not in derived
    assert "growing" not in derived
    assert derived["crops"]["num_crops"] == 6 and derived["storage"] == storage_attrs(3, 8, 70_000)
    with pytest.raises(TypeError, match="'teachers'"):
        cache_attrs(**{key: v for key, v in identity.items() if key != "teachers"}, k=1, images_per_shard=1)
    assert index_dtype(65_535) == np.uint16 and index_dtype(65_536) == np.int32
