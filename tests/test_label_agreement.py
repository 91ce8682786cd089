"""The ensemble's agreement with the labels, recorded in a cache's attributes.

The expected figures are recomputed here with plain loops from the arrays as
zarr stores them and from the manifest's ``label`` column as pyarrow reads it,
for a fresh, grown, merged, subset and reduced cache.
"""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr
from click.testing import CliRunner

from stage2_student_distill.app.cli import main
from stage1_fixtures import config, dataset  # noqa: F401
from stage1_teacher_cache.label_agreement import AgreementCounts, crop_top1
from stage1_teacher_cache.run import run


def by_loops(cache, manifest) -> dict:
    group = zarr.open_group(str(cache), mode="r")
    index, prob = np.asarray(group["topk_index"][:]), np.asarray(group["topk_prob"][:])
    labels = pq.read_table(manifest, columns=["label"]).column("label").to_pylist()
    num_classes = int(group.attrs["num_classes"])
    crops, agree, images, mostly = [0] * num_classes, [0] * num_classes, [0] * num_classes, [0] * num_classes
    unlabeled = 0
    for i, label in enumerate(labels):
        if label < 0:
            unlabeled += 1
            continue
        hits = 0
        for c in range(index.shape[1]):
            best = max(range(index.shape[2]), key=lambda j: (float(prob[i, c, j]), -j))
            hits += int(index[i, c, best]) == label
        crops[label] += index.shape[1]
        agree[label] += hits
        images[label] += 1
        mostly[label] += (index.shape[1] - hits) > index.shape[1] / 2
    pct = lambda a, b: 100.0 * a / b if b else None  # noqa: E731
    return {"crops_pct": pct(sum(agree), sum(crops)), "images_mostly_disagreeing_pct": pct(sum(mostly), sum(images)),
            "per_class_pct": [pct(a, c) for a, c in zip(agree, crops)], "labelled_images": sum(images),
            "unlabeled_images": unlabeled}


def assert_recorded(cache, manifest) -> dict:
    recorded = json.loads((cache / "zarr.json").read_text())["attributes"]["label_agreement"]
    expected = by_loops(cache, manifest)
    per_class = [None if v is None else pytest.approx(v, abs=1e-3) for v in expected.pop("per_class_pct")]
    assert recorded["per_class_pct"] == per_class
    assert {k: v for k, v in recorded.items() if k != "per_class_pct"} == pytest.approx(expected, abs=1e-3)
    return recorded


def cli(*args: str):
    result = CliRunner().invoke(main, ["--set", "runtime.progress=false", "--set", "runtime.device=cpu", *args])
    assert result.exit_code == 0, result.output
    return result.output


def test_counts_against_loops_with_unlabelled_images_and_ties():
    rng = np.random.default_rng(0)
    n, C, k, K = 40, 5, 3, 4
    index = np.stack([rng.permutation(K)[:k] for _ in range(n * C)]).reshape(n, C, k)
    prob = rng.random((n, C, k)).astype(np.float16)
    prob[0, 0] = 0.25  # a tie: the first stored class wins
    labels = rng.integers(-1, K, n)
    top1 = crop_top1(index, prob)
    assert top1[0, 0] == index[0, 0, 0]
    counts = AgreementCounts.zeros(K)
    counts.add(top1[:25], labels[:25])  # in two parts, as shards are
    counts.add(top1[25:], labels[25:])
    s = counts.summary()
    agree = sum(int(top1[i, c] == labels[i]) for i in range(n) for c in range(C) if labels[i] >= 0)
    labelled = [i for i in range(n) if labels[i] >= 0]
    assert s["unlabeled_images"] == n - len(labelled) and s["labelled_images"] == len(labelled)
    assert s["crops_pct"] == pytest.approx(100 * agree / (len(labelled) * C), abs=1e-4)
    mostly = sum(1 for i in labelled if sum(top1[i, c] != labels[i] for c in range(C)) >= 3)
    assert s["images_mostly_disagreeing_pct"] == pytest.approx(100 * mostly / len(labelled), abs=1e-4)


def test_fresh_grown_merged_subset_and_reduced_caches_record_a_recomputed_figure(dataset, tmp_path):  # noqa: F811
    train = dataset["train"]
    fresh = tmp_path / "fresh"
    run(config(train, fresh, **{"crops.num_crops": 2}))
    first = assert_recorded(fresh, train)

    info = cli("cache", "info", str(fresh))
    assert f"ensemble top-1 = label on {first['crops_pct']:.2f}% of crops" in info
    assert json.loads(cli("cache", "info", str(fresh), "--json"))["label_agreement"] == first

    run(config(train, fresh, **{"crops.num_crops": 2}), more_crops=2)  # grown to 4 crops per image
    grown = assert_recorded(fresh, train)
    assert json.loads((fresh / "zarr.json").read_text())["attributes"]["crops"]["num_crops"] == 4
    assert grown["labelled_images"] == first["labelled_images"]

    one = {"teacher_cache.teachers": ["test_resnet"], "teacher_cache.input_sizes": ["test_resnet=32"]}
    two = {"teacher_cache.teachers": ["test_efficientnet"], "teacher_cache.input_sizes": ["test_efficientnet=40"]}
    a, b = tmp_path / "a", tmp_path / "b"
    run(config(train, a, **one))
    run(config(train, b, **two))
    cli("cache", "merge", str(a), str(b), "--out", str(tmp_path / "merged"), "--manifest", str(train))
    assert_recorded(tmp_path / "merged", train)
    cli("cache", "merge", str(a), str(b), "--out", str(tmp_path / "merged-unlabelled"))
    assert "label_agreement" not in json.loads((tmp_path / "merged-unlabelled" / "zarr.json").read_text())["attributes"]
    assert "agreement not recorded" in cli("cache", "info", str(tmp_path / "merged-unlabelled"))

    sub_manifest = tmp_path / "sub.parquet"
    cli("cache", "subset", str(a), "--out", str(tmp_path / "sub"), "--manifest", str(train),
        "--subset-manifest-out", str(sub_manifest), "--classes", "ant,cat")
    sub = assert_recorded(tmp_path / "sub", sub_manifest)
    assert sub["per_class_pct"][1] is None  # no "bee" image left, so no figure for it

    cli("cache", "reduce", str(a), "--out", str(tmp_path / "k1"), "--topk", "1", "--manifest", str(train))
    assert_recorded(tmp_path / "k1", train)
