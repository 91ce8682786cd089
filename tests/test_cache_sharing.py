"""Caches made from caches: --reuse-crops, merge, subset, pack/unpack, fsspec URLs."""
from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from common.cache_format import CacheError, CacheReader, CacheWriter, verify_cache
from common.cache_storage import restore_targets, round_down_fp16
from stage2_student_distill.app.cli import main
from common.config import RuntimeConfig
from common.manifest import load_manifest
from common.models import create_model
from common.runtime import build_runtime
from stage1_fixtures import INPUT_SIZES, TEACHERS, config, dataset  # noqa: F401
from stage1_teacher_cache.pack import INDEX_NAME, PackError, pack_cache, unpack_cache
from stage1_teacher_cache.run import run
from stage1_teacher_cache.sharing import merge_caches, merge_targets, parse_image_ids, reduce_topk, subset_cache
from stage2_student_distill.loaders import build_loader

ARRAYS = ("boxes", "flip", "topk_index", "topk_prob")


def read_all(path) -> dict[str, np.ndarray]:
    reader = CacheReader(path)
    return {name: np.asarray(reader.arrays[name][:]) for name in ARRAYS}


def one_teacher(i: int) -> dict:
    return {"teacher_cache.teachers": [TEACHERS[i]], "teacher_cache.input_sizes": [INPUT_SIZES[i]]}


def cli(*args: str):
    return CliRunner().invoke(main, ["--set", "runtime.progress=false", "--set", "runtime.device=cpu", *args])


@pytest.fixture(scope="module")
def caches(dataset):  # noqa: F811
    """k = all 3 classes, so a merge of the one-teacher caches must equal the two-teacher run."""
    tmp, train = dataset["tmp"], dataset["train"]
    a, b, both = tmp / "share-A", tmp / "share-B", tmp / "share-AB"
    run(config(train, a, **{"teacher_cache.topk": 3}, **one_teacher(0)))
    # B through the CLI, with another crop seed that --reuse-crops must override
    result = cli("teacher-cache", "--teachers", TEACHERS[1], "--input-size", INPUT_SIZES[1], "--manifest", str(train),
                 "--out", str(b), "--reuse-crops", str(a), "--topk", "3", "--batch-size", "7",
                 "--images-per-shard", "4", "--num-crops", "3", "--crop-seed", "5", "--loader", "torch",
                 "--no-pretrained")
    assert result.exit_code == 0, result.output
    run(config(train, both, **{"teacher_cache.topk": 3}))
    return {"A": a, "B": b, "AB": both, "tmp": tmp, "train": train, "val": dataset["val"]}


def test_reuse_crops_takes_boxes_and_crop_attrs_from_the_source(caches):
    a, b = CacheReader(caches["A"]), CacheReader(caches["B"])
    assert b.attrs["crops"] == a.attrs["crops"] and b.attrs["crops"]["seed"] == 0
    assert b.attrs["crops_from"] == str(caches["A"])
    got, want = read_all(caches["B"]), read_all(caches["A"])
    assert np.array_equal(got["boxes"], want["boxes"]) and np.array_equal(got["flip"], want["flip"])
    assert not np.array_equal(got["topk_prob"], want["topk_prob"])  # another teacher's targets


def test_reuse_crops_needs_the_same_manifest(caches):
    with pytest.raises(CacheError, match="built for manifest"):
        run(config(caches["val"], caches["tmp"] / "never", **one_teacher(1)), reuse_crops=str(caches["A"]))
    assert not (caches["tmp"] / "never").exists()


def test_merge_of_one_teacher_caches_equals_the_ensemble_run(caches):
    out = caches["tmp"] / "merged"
    result = cli("cache", "merge", str(caches["A"]), str(caches["B"]), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "weights 0.500, 0.500" in result.output

    merged, reference = read_all(out), read_all(caches["AB"])
    assert np.array_equal(merged["boxes"], reference["boxes"]) and np.array_equal(merged["flip"], reference["flip"])
    assert np.array_equal(merged["topk_index"], reference["topk_index"])
    np.testing.assert_allclose(merged["topk_prob"].astype(np.float32), reference["topk_prob"].astype(np.float32),
                               atol=2e-3)

    attrs = CacheReader(out).attrs
    assert [t["name"] for t in attrs["teachers"]] == list(TEACHERS)
    assert attrs["storage"]["k"] == 3 and attrs["merge"]["k"] == 3
    assert [(s["path"], s["k"], s["weight"]) for s in attrs["merge"]["sources"]] == [
        (str(caches["A"]), 3, 0.5), (str(caches["B"]), 3, 0.5)]
    manifest = load_manifest(caches["train"])
    assert verify_cache(out, manifest_hash=manifest.content_hash) == []
    info = cli("cache", "info", str(out))
    assert info.exit_code == 0 and "merged        to top-3 from:" in info.output, info.output

    # what `pipeline distill` does with it: open for the manifest and class count, stream an epoch
    cache = CacheReader(out, manifest_hash=manifest.content_hash, num_classes=manifest.num_classes)
    _, pre = create_model(TEACHERS[0], 3, input_size=16)
    loader = build_loader("torch", manifest=manifest, mode="distill", preprocess=pre, batch_size=3,
                          runtime=build_runtime(RuntimeConfig(device="cpu", num_workers=0)), cache=cache)
    batches = list(loader.epoch(0))
    assert sum(len(b.image_ids) for b in batches) == manifest.num_images
    torch.testing.assert_close(batches[0].targets.sum(-1), torch.ones(3))


def test_merge_keeps_the_smallest_k_unless_told(caches):
    small = caches["tmp"] / "A-k2"
    run(config(caches["train"], small, **{"teacher_cache.images_per_shard": 3}, **one_teacher(0)))  # k = 2
    out = caches["tmp"] / "merged-k2"
    summary = merge_caches([str(small), str(caches["B"])], str(out))
    assert summary["k"] == 2 and CacheReader(out).topk == 2
    assert CacheReader(out).layout.images_per_shard == 3  # the first source's; the second has shards of 4
    assert [s["k"] for s in CacheReader(out).attrs["merge"]["sources"]] == [2, 3]
    top1 = read_all(out)["topk_index"][..., 0]
    assert (top1 == read_all(caches["AB"])["topk_index"][..., 0]).mean() > 0.9
    assert CacheReader(merge_caches([str(small), str(caches["B"])], str(caches["tmp"] / "k1"), topk=1)["cache"]).topk == 1


def test_merge_weights_sources_by_their_number_of_teachers():
    rng = np.random.default_rng(0)
    classes, k = 6, 6
    dense = rng.dirichlet(np.ones(classes), size=(2, 5, 2))  # 2 sources, 5 images, 2 crops
    parts = []
    for d in dense:
        index = np.argsort(-d, axis=-1)[..., :k]
        parts.append({"topk_index": index, "topk_prob": np.take_along_axis(d, index, -1).astype(np.float16)})
    weights = np.array([2 / 3, 1 / 3])  # 2 teachers in the first cache, 1 in the second
    index, prob = merge_targets(parts, weights, classes, k)
    expected = weights[0] * dense[0] + weights[1] * dense[1]
    got = restore_targets(index, prob, classes).numpy()
    np.testing.assert_allclose(got, expected, atol=2e-3)
    assert np.array_equal(index[..., 0], expected.argmax(-1))


def test_merge_of_confident_rows_keeps_a_residual_for_the_other_classes():
    """Both sources keep ~4e-4 for their 8 other classes; rounded to nearest, the merged top-2 would sum to 1."""
    classes, k = 10, 2
    sources = [[0.563, 0.4366], [0.626, 0.3738]]  # top-2 of each source, same two classes
    parts = [{"topk_index": np.array([[[3, 5]]]), "topk_prob": round_down_fp16(np.array([[p]], np.float32))}
             for p in sources]
    index, prob = merge_targets(parts, np.array([0.5, 0.5]), classes, k)
    assert index.tolist() == [[[3, 5]]]
    assert prob.astype(np.float16).astype(np.float32).sum() == 1  # why rounding must go down
    stored = round_down_fp16(prob)  # what CacheWriter.write_shard keeps
    assert stored.astype(np.float32).sum() < 1
    target = restore_targets(index, stored, classes)
    assert float(target[0, 0].min()) > 1e-5  # every other class keeps a share


def test_reduce_keeps_the_most_probable_stored_classes(caches, tmp_path):
    """k = 3 -> 1 through the CLI: the first stored column, same values, same crops; identical to a k = 1 run."""
    out = tmp_path / "AB-k1"
    result = cli("cache", "reduce", str(caches["AB"]), "--topk", "1", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "from top-3 to top-1" in result.output
    full, reduced = read_all(caches["AB"]), read_all(out)
    assert np.array_equal(reduced["boxes"], full["boxes"]) and np.array_equal(reduced["flip"], full["flip"])
    assert np.array_equal(reduced["topk_index"], full["topk_index"][..., :1])
    assert np.array_equal(reduced["topk_prob"], full["topk_prob"][..., :1])
    attrs = CacheReader(out).attrs
    assert attrs["storage"]["k"] == 1 and attrs["reduced"] == {"source": str(caches["AB"]), "source_k": 3, "k": 1}
    manifest = load_manifest(caches["train"])
    assert verify_cache(out, manifest_hash=manifest.content_hash) == []
    info = cli("cache", "info", str(out))
    assert info.exit_code == 0 and f"reduced       to top-1 from top-3 of {caches['AB']}" in info.output, info.output

    # what stage 1 itself writes with k = 1 on the same crops and teachers
    direct = tmp_path / "AB-direct-k1"
    run(config(caches["train"], direct, **{"teacher_cache.topk": 1}))
    assert {n: v.tolist() for n, v in read_all(direct).items()} == {n: v.tolist() for n, v in reduced.items()}

    rerun = cli("cache", "reduce", str(caches["AB"]), "--topk", "1", "--out", str(out))
    assert rerun.exit_code == 0 and "wrote 0 of" in rerun.output, rerun.output  # complete: nothing to redo


def test_reduce_sorts_an_unsorted_source_and_refuses_a_larger_k(caches, tmp_path):
    reader, source = CacheReader(caches["AB"]), tmp_path / "unsorted"
    writer = CacheWriter(source, reader.attrs)  # the same cache with its classes stored least probable first
    for shard in range(reader.layout.num_shards):
        rows = reader.images(np.arange(*writer.shard_range(shard)))
        writer.write_shard(shard, rows["boxes"], rows["flip"], rows["topk_index"][..., ::-1],
                           rows["topk_prob"][..., ::-1])
    reduce_topk(str(source), str(tmp_path / "from-unsorted"), 2)
    full, reduced = read_all(caches["AB"]), read_all(tmp_path / "from-unsorted")
    assert np.array_equal(reduced["topk_index"], full["topk_index"][..., :2])
    assert np.array_equal(reduced["topk_prob"], full["topk_prob"][..., :2])

    for k in (3, 0):
        result = cli("cache", "reduce", str(caches["AB"]), "--topk", str(k), "--out", str(tmp_path / f"bad{k}"))
        assert result.exit_code != 0 and "must be between 1 and 2" in result.output, result.output
        assert not (tmp_path / f"bad{k}").exists()


def _edit_attrs(path: Path, **changes) -> None:
    zarr.open_group(str(path), mode="r+").attrs.update(changes)


def _rewrite_box(path: Path) -> None:
    zarr.open_group(str(path), mode="r+")["boxes"][0:1, 0:1] = np.array([[[0, 0, 5, 5]]], np.int32)


@pytest.mark.parametrize("make_other, named", [
    (lambda c, o: run(config(c["train"], o, **{"teacher_cache.topk": 3, "crops.seed": 1}, **one_teacher(1))),
     "crops: "),
    (lambda c, o: run(config(c["val"], o, **{"teacher_cache.topk": 3}, **one_teacher(1))), "manifest: "),
    (lambda c, o: (shutil.copytree(c["B"], o), _edit_attrs(o, class_names=["x", "y", "z"])), "class_names: "),
    (lambda c, o: shutil.copytree(c["A"], o), "teacher test_resnet is in both"),
    (lambda c, o: (shutil.copytree(c["B"], o), _rewrite_box(o)), "crops differ (boxes of image 0"),
], ids=["crop-seed", "manifest", "class-names", "same-teacher", "boxes"])
def test_merge_refuses_other_inputs_naming_the_difference(caches, tmp_path, make_other, named):
    other, out = tmp_path / "other", tmp_path / "merged"
    make_other(caches, other)
    result = cli("cache", "merge", str(caches["A"]), str(other), "--out", str(out))
    assert result.exit_code == 1 and named in result.output, result.output
    assert "Traceback" not in result.output
    assert not out.exists()  # refused before anything is written


def test_subset_by_class_writes_manifest_and_cache(caches, tmp_path):
    source = load_manifest(caches["train"])
    out, m2 = tmp_path / "bees", tmp_path / "bees.parquet"
    result = cli("cache", "subset", str(caches["AB"]), "--out", str(out), "--manifest", str(caches["train"]),
                 "--subset-manifest-out", str(m2), "--classes", "bee")
    assert result.exit_code == 0, result.output

    sub = load_manifest(m2)
    chosen = np.flatnonzero(source.labels == 1)
    assert sub.num_images == len(chosen) > 0 and sub.image_ids.tolist() == list(range(len(chosen)))
    assert sub.class_names == source.class_names and sub.root == source.root  # label space kept
    assert sub.paths == [source.paths[i] for i in chosen] and (sub.labels == 1).all()
    got, full = read_all(out), read_all(caches["AB"])
    for name in ARRAYS:
        assert np.array_equal(got[name], full[name][chosen]), name
    attrs = CacheReader(out, manifest_hash=sub.content_hash, num_classes=3).attrs
    assert attrs["num_classes"] == 3 and attrs["manifest"] == {"hash": sub.content_hash, "num_images": len(chosen)}
    assert attrs["subset"]["selection"] == {"classes": ["bee"]} and attrs["subset"]["source"] == str(caches["AB"])
    assert attrs["manifest_path"] == str(m2)
    assert verify_cache(out, manifest_hash=sub.content_hash) == []


def test_subset_by_image_ids_from_ranges_or_a_file(caches, tmp_path):
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("# every other image\n8, 0\n2 4\n6\n")
    for spec, expected in (("0:3,7", [0, 1, 2, 7]), (str(ids_file), [0, 2, 4, 6, 8])):
        out, m2 = tmp_path / f"sub{len(expected)}", tmp_path / f"sub{len(expected)}.parquet"
        summary = subset_cache(str(caches["AB"]), str(out), str(caches["train"]), str(m2), image_ids=spec)
        assert summary["images"] == len(expected)
        assert np.array_equal(read_all(out)["topk_prob"], read_all(caches["AB"])["topk_prob"][expected])
        assert load_manifest(m2).paths == [load_manifest(caches["train"]).paths[i] for i in expected]
    assert "file_sha256" in CacheReader(out).attrs["subset"]["selection"]


@pytest.mark.parametrize("kwargs, message", [
    ({"classes": ["wasp"]}, "not among the manifest's classes"),
    ({"image_ids": "3:12"}, "ids must be in 0..8"),
    ({"image_ids": "1,1"}, "listed twice"),
    ({"image_ids": "a-b"}, "neither an id nor a START:STOP range"),
    ({"image_ids": "2:2"}, "matches no image"),
    ({"image_ids": "1", "manifest": "val"}, "built for manifest"),
])
def test_subset_refuses_bad_selections(caches, tmp_path, kwargs, message):
    manifest = str(caches["val"] if kwargs.pop("manifest", None) else caches["train"])
    with pytest.raises(CacheError, match=message):
        subset_cache(str(caches["AB"]), str(tmp_path / "c"), manifest, str(tmp_path / "m.parquet"), **kwargs)
    assert not (tmp_path / "c").exists()


def test_parse_image_ids_sorts_and_joins():
    assert parse_image_ids("5,0:2, 9", 10).tolist() == [0, 1, 5, 9]


def test_pack_unpack_round_trip_is_exact_and_reproducible(caches, tmp_path):
    pack, again = tmp_path / "c.tar", tmp_path / "again.tar"
    result = cli("cache", "pack", str(caches["AB"]), "--out", str(pack))
    assert result.exit_code == 0, result.output
    pack_cache(str(caches["AB"]), str(again))
    assert pack.read_bytes() == again.read_bytes()  # sorted members, zeroed owners and times
    with tarfile.open(pack) as tar:
        names = tar.getnames()
    assert names[-1] == INDEX_NAME and names[:-1] == sorted(names[:-1])

    out = tmp_path / "unpacked"
    result = cli("cache", "unpack", str(pack), "--out", str(out))
    assert result.exit_code == 0, result.output
    got, want = read_all(out), read_all(caches["AB"])
    assert all(np.array_equal(got[n], want[n]) for n in ARRAYS)
    assert verify_cache(out) == []


def _copy_pack(src: Path, dst: Path, extra: list[tarfile.TarInfo] = (), drop: str | None = None) -> None:
    with tarfile.open(src) as tin, tarfile.open(dst, "w", format=tarfile.PAX_FORMAT) as tout:
        for m in tin.getmembers():
            if m.name != drop:
                tout.addfile(m, tin.extractfile(m))
        for m in extra:
            tout.addfile(m, io.BytesIO(b"x" * m.size) if m.isreg() else None)


def _member(name: str, kind=tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, 1 if kind == tarfile.REGTYPE else 0
    return info


def _flip_byte(src: Path, dst: Path, member: str) -> None:
    with tarfile.open(src) as tar:
        offset = tar.getmember(member).offset_data
    data = bytearray(src.read_bytes())
    data[offset] ^= 0x01
    dst.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, message", [
    (lambda s, d: _flip_byte(s, d, "topk_prob/c/1/0/0"), "member 'topk_prob/c/1/0/0': sha256 mismatch"),
    (lambda s, d: d.write_bytes(s.read_bytes()[: s.stat().st_size // 2]), "truncated"),
    (lambda s, d: _copy_pack(s, d, drop=INDEX_NAME), f"no {INDEX_NAME} member"),
    (lambda s, d: _copy_pack(s, d, drop="boxes/c/0/0/0"), "member 'boxes/c/0/0/0' (and 0 more) listed in the index is missing"),
    (lambda s, d: _copy_pack(s, d, extra=[_member("../evil.txt")]), "member '../evil.txt': contains '..'"),
    (lambda s, d: _copy_pack(s, d, extra=[_member("/tmp/evil.txt")]), "member '/tmp/evil.txt': absolute path"),
    (lambda s, d: _copy_pack(s, d, extra=[_member("link", tarfile.SYMTYPE, "/etc/passwd")]),
     "member 'link' is a symbolic link"),
    (lambda s, d: _copy_pack(s, d, extra=[_member("hard", tarfile.LNKTYPE, "zarr.json")]),
     "member 'hard' is a hard link"),
    (lambda s, d: _copy_pack(s, d, extra=[_member("extra.bin")]), "member 'extra.bin' is not in the pack index"),
], ids=["bit-flip", "truncated", "no-index", "missing-member", "dotdot", "absolute", "symlink", "hardlink", "unlisted"])
def test_unpack_refuses_damaged_or_unsafe_packs(caches, tmp_path, damage, message):
    good, bad, out = tmp_path / "good.tar", tmp_path / "bad.tar", tmp_path / "dest" / "cache"
    pack_cache(str(caches["AB"]), str(good))
    damage(good, bad)
    result = cli("cache", "unpack", str(bad), "--out", str(out))
    assert result.exit_code == 1 and message in result.output, result.output
    assert not out.exists() and list(out.parent.iterdir()) == []  # no partial cache, no temp dir
    assert not (tmp_path / "evil.txt").exists()


def test_unpack_never_overwrites(caches, tmp_path):
    pack = tmp_path / "c.tar"
    pack_cache(str(caches["AB"]), str(pack))
    (tmp_path / "taken").mkdir()
    with pytest.raises(PackError, match="already exists"):
        unpack_cache(str(pack), str(tmp_path / "taken"))


def test_fsspec_urls_for_writing_reading_and_verifying(caches, tmp_path):
    mem = "memory://sharing-test/cache"
    summary = run(config(caches["train"], mem, **{"teacher_cache.topk": 3}))
    stored = fsspec.filesystem("memory").du("/sharing-test/cache")  # every object under the prefix
    assert summary["shards_complete"] == 3 and summary["bytes_on_disk"] == stored > 0
    local_url = (tmp_path / "via-url").as_uri()  # file:///...
    run(config(caches["train"], local_url, **{"teacher_cache.topk": 3}))
    reference = read_all(caches["AB"])
    for location in (mem, local_url):
        assert verify_cache(location) == []
        got = read_all(location)
        assert all(np.array_equal(got[n], reference[n]) for n in ARRAYS), location
    assert (tmp_path / "via-url" / "zarr.json").is_file()  # file:// is the local directory

    result = cli("cache", "verify", mem)
    assert result.exit_code == 0 and result.output.startswith("OK:"), result.output
    merged = "memory://sharing-test/merged"
    merge_caches([str(caches["A"]), str(caches["B"])], merged)
    assert verify_cache(merged) == [] and len(CacheReader(merged).attrs["teachers"]) == 2
    with pytest.raises(CacheError, match="not a readable Zarr v3 teacher cache"):
        CacheReader("memory://sharing-test/nothing-here")
