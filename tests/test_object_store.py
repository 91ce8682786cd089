"""Caches and manifests on a real S3-compatible server: moto's standalone server on 127.0.0.1 with s3fs.

One server per module. The endpoint and credentials are set the way a user
sets them (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY; see
docs/object-stores.md), in this process and so in every child it starts; the
commands see plain s3:// URLs. Images stay on the local disk (a manifest names
files under a local root). Expected arrays come from the same runs on local
paths, which tests/test_teacher_cache.py checks against the teachers directly.
"""
from __future__ import annotations

import json
import logging
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("moto.server", reason="S3 tests need moto's server: pip install 'moto[server]' (in the test extra)")
pytest.importorskip("s3fs", reason="S3 tests need s3fs: pip install 'mealv2-pipeline[s3]'")

from common.cache_format import CacheReader, verify_cache  # noqa: E402
from stage2_student_distill.app.cli import main  # noqa: E402
from common.manifest import load_manifest  # noqa: E402
from data_manifests.build import build_manifest  # noqa: E402
from fault_kill_resume import Writer, wait_until  # noqa: E402
from stage1_fixtures import INPUT_SIZES, SIZES, TEACHERS, config, make_manifest, overrides, write_tree  # noqa: E402
from stage1_teacher_cache.run import run  # noqa: E402
from stage2_student_distill.metrics import read_metrics  # noqa: E402

ARRAYS = ("boxes", "flip", "topk_index", "topk_prob")
BUCKET = "meal-test"


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on a free localhost port, the AWS variables pointing at it, one empty bucket."""
    import s3fs
    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request in the test output
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    with pytest.MonkeyPatch.context() as env:
        for name, value in {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": "/nonexistent",  # a developer's own ~/.aws must not leak in
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
        }.items():
            env.setenv(name, value)
        s3fs.S3FileSystem.clear_instance_cache()  # instances made before carry other settings
        fs = s3fs.S3FileSystem()
        fs.mkdir(BUCKET)
        yield fs
        s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def cli(*args) -> str:
    result = CliRunner().invoke(main, ["--set", "runtime.progress=false", "--set", "runtime.device=cpu", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result.output


def read_all(path) -> dict[str, np.ndarray]:
    reader = CacheReader(path)
    return {name: np.asarray(reader.arrays[name][:]) for name in ARRAYS}


def assert_same_arrays(got, want) -> None:
    got, want = read_all(got), read_all(want)
    assert [n for n in ARRAYS if not np.array_equal(got[n], want[n])] == []


@pytest.fixture(scope="module")
def stores(s3, tmp_path_factory):
    """Manifests built straight to s3://, their local twins, and a teacher cache written to s3:// by the CLI."""
    tmp = tmp_path_factory.mktemp("s3")
    local = {"train": make_manifest(tmp, "train"), "val": make_manifest(tmp, "val", sizes=SIZES[:6], seed=1)}
    remote = {}
    for split in local:
        remote[split] = f"s3://{BUCKET}/manifests/{split}.parquet"
        cli("manifest", "build", str(tmp / f"{split}-images"), "--out", remote[split], "--no-progress")
    cache = f"s3://{BUCKET}/cache"
    cli("teacher-cache", "--teachers", ",".join(TEACHERS), *[a for s in INPUT_SIZES for a in ("--input-size", s)],
        "--no-pretrained", "--manifest", remote["train"], "--out", cache, "--num-crops", "3", "--topk", "3",
        "--batch-size", "7", "--images-per-shard", "4", "--loader", "torch")
    reference = tmp / "local-cache"  # the same run on local paths (k = all 3 classes, for the merge test)
    run(config(local["train"], reference, **{"teacher_cache.topk": 3}))
    return {"tmp": tmp, "local": local, "remote": remote, "cache": cache, "reference": reference}


def test_manifest_build_writes_to_s3_and_every_reader_reads_it(s3, stores, tmp_path):
    for split in ("train", "val"):
        got, want = load_manifest(stores["remote"][split]), load_manifest(stores["local"][split])
        assert got.content_hash == want.content_hash and got.paths == want.paths
    assert s3.exists(f"{BUCKET}/manifests/train.parquet")
    info = json.loads(cli("manifest", "info", "--json", stores["remote"]["train"]))
    assert info["path"] == stores["remote"]["train"] and info["num_images"] == 9

    # --skip-bad lists the rejects next to the manifest, on the store too; a clean rebuild removes the list
    tree = write_tree(tmp_path / "tree", SIZES[:3], seed=2)
    (tree / "ant" / "notes.txt").write_text("not an image")
    out = f"s3://{BUCKET}/manifests/skipped.parquet"
    cli("manifest", "build", str(tree), "--out", out, "--skip-bad", "--no-progress")
    s3.invalidate_cache()
    assert "ant/notes.txt" in s3.cat_file(f"{BUCKET}/manifests/skipped.rejects.jsonl").decode()
    (tree / "ant" / "notes.txt").unlink()
    build_manifest(tree, out, progress=False)
    s3.invalidate_cache()
    assert not s3.exists(f"{BUCKET}/manifests/skipped.rejects.jsonl")


def test_teacher_cache_on_s3_equals_the_local_one_and_cache_commands_read_it(s3, stores):
    cache = stores["cache"]
    assert_same_arrays(cache, stores["reference"])
    assert s3.exists(f"{BUCKET}/cache/zarr.json")
    info = cli("cache", "info", cache)
    assert "3/3 shards" in info and "n/a" not in info  # remote caches report their size too
    s3.invalidate_cache()
    assert json.loads(cli("cache", "info", "--json", cache))["bytes_on_disk"] == s3.du(f"{BUCKET}/cache") > 0
    assert "OK:" in cli("cache", "verify", cache, "--manifest", stores["remote"]["train"])
    assert verify_cache(cache) == []


def test_merge_and_pack_read_s3_caches(s3, stores, tmp_path):
    train = stores["remote"]["train"]
    one = {"--num-crops": "3", "--topk": "3", "--batch-size": "7", "--images-per-shard": "4", "--loader": "torch"}
    flags = [a for kv in one.items() for a in kv]
    for i, name in enumerate("AB"):
        extra = ["--reuse-crops", f"s3://{BUCKET}/one-A"] if name == "B" else []
        cli("teacher-cache", "--teachers", TEACHERS[i], "--input-size", INPUT_SIZES[i], "--no-pretrained",
            "--manifest", train, "--out", f"s3://{BUCKET}/one-{name}", *flags, *extra)
    merged = f"s3://{BUCKET}/merged"
    cli("cache", "merge", f"s3://{BUCKET}/one-A", f"s3://{BUCKET}/one-B", "--out", merged)
    # k = all 3 classes: the merge equals the two-teacher run up to float16 rounding
    got, want = read_all(merged), read_all(stores["reference"])
    assert all(np.array_equal(got[n], want[n]) for n in ("boxes", "flip", "topk_index"))
    np.testing.assert_allclose(got["topk_prob"].astype(np.float32), want["topk_prob"].astype(np.float32), atol=2e-3)

    pack, repack = tmp_path / "merged.tar", tmp_path / "again.tar"
    cli("cache", "pack", merged, "--out", str(pack))
    cli("cache", "unpack", str(pack), "--out", str(tmp_path / "unpacked"))
    assert_same_arrays(tmp_path / "unpacked", merged)
    cli("cache", "pack", str(tmp_path / "unpacked"), "--out", str(repack))
    assert pack.read_bytes() == repack.read_bytes()  # the same cache packs to the same bytes wherever it lives


def test_subset_and_reduce_write_caches_and_manifests_to_s3(stores):
    sub, sub_manifest, reduced = (f"s3://{BUCKET}/sub", f"s3://{BUCKET}/manifests/sub.parquet",
                                  f"s3://{BUCKET}/reduced")
    cli("cache", "subset", stores["cache"], "--manifest", stores["remote"]["train"], "--classes", "ant",
        "--subset-manifest-out", sub_manifest, "--out", sub)
    manifest = load_manifest(sub_manifest)
    assert manifest.num_images == 3 and set(manifest.labels.tolist()) == {0}
    assert CacheReader(sub).attrs["manifest_path"] == sub_manifest  # recorded as given, not made a local path
    assert verify_cache(sub, manifest_hash=manifest.content_hash) == []
    whole = read_all(stores["cache"])
    ants = np.flatnonzero(load_manifest(stores["remote"]["train"]).labels == 0)
    assert np.array_equal(read_all(sub)["topk_index"], whole["topk_index"][ants])

    cli("cache", "reduce", stores["cache"], "--topk", "1", "--out", reduced)
    assert np.array_equal(read_all(reduced)["topk_index"], whole["topk_index"][..., :1])


def test_distill_trains_from_s3_cache_and_manifests_like_from_local_ones(stores, tmp_path):
    def distill(cache, manifests, out):
        cli("distill", "--student", "test_resnet", "--cache", cache, "--manifest", manifests["train"],
            "--val-manifest", manifests["val"], "--out", str(out), "--epochs", "1", "--batch-size", "4",
            "--img-size", "32", "--loader", "torch", "--num-workers", "1", "--lr", "0.05")
        return [{k: v for k, v in r.items() if k not in ("img_per_s", "time_s")} for r in read_metrics(out / "metrics.jsonl")]

    remote = distill(stores["cache"], stores["remote"], tmp_path / "remote")
    assert remote == distill(stores["reference"], stores["local"], tmp_path / "local")
    assert remote[0]["epoch"] == 1


def test_writer_killed_mid_cache_on_s3_resumes_to_completion(s3, tmp_path):
    manifest = make_manifest(tmp_path, "kill", sizes=[SIZES[i % len(SIZES)] for i in range(16)])
    one_teacher = {"teacher_cache.teachers": TEACHERS[:1], "teacher_cache.input_sizes": INPUT_SIZES[:1]}
    settings = lambda out: overrides(manifest, out, **{"teacher_cache.images_per_shard": 2}, **one_teacher)  # noqa: E731  8 shards
    reference = tmp_path / "reference"  # forked too: a forked child runs torch single-threaded
    assert Writer("fork", settings(reference), tmp_path).wait() == 0

    out = f"s3://{BUCKET}/killed"

    def records() -> int:
        try:
            return len(s3.ls(f"{BUCKET}/killed/shard_record/c", refresh=True))
        except FileNotFoundError:
            return 0

    writer = Writer("fork", settings(out), tmp_path)
    wait_until(lambda: records() >= 2, writer, timeout=120)
    assert writer.running(), "the writer finished before the kill; the test needs more shards"
    writer.kill()
    writer.wait()
    at_kill = int(CacheReader(out, require_complete=False).complete.sum())
    assert 2 <= at_kill < 8
    started = time.monotonic()
    assert Writer("fork", settings(out), tmp_path).wait() == 0
    assert time.monotonic() - started < 120
    assert verify_cache(out) == []
    assert_same_arrays(out, reference)


def test_a_cache_on_s3_grows_to_the_from_scratch_one(s3, stores):
    """`--more-crops` on an object store: no directory rename there, so the swap copies and deletes."""
    out = f"s3://{BUCKET}/grown"
    settings = {"teacher_cache.topk": 3}
    run(config(stores["remote"]["train"], out, **settings, **{"crops.num_crops": 2}))
    run(config(stores["remote"]["train"], out, **settings, **{"crops.num_crops": 2}), more_crops=1)
    s3.invalidate_cache()
    assert not s3.exists(f"{BUCKET}/grown/grow")  # the staging cache is gone
    assert_same_arrays(out, stores["reference"])  # built locally with 3 crops from scratch
    assert verify_cache(out) == [] and "grown         from 2 to 3" in cli("cache", "info", out)
