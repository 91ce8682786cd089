"""Hostile caches and packs (issue #26): every one is refused quickly, on one line, naming the file or key.

Each test starts from a small sound cache written by CacheWriter and breaks exactly one thing the
way an attacker would (a special file, a zstd bomb, forged sizes, forged values, forged attribute
types, a forged pack), then drives the real CLI. The costs (time, peak memory) of the same inputs
are measured by hand (docs/reliability.md), not asserted here.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import tarfile
from pathlib import Path

import google_crc32c
import numpy as np
import pytest
from click.testing import CliRunner
from numcodecs.zstd import Zstd

from common.cache_format import (MAX_SHARDS, CacheError, CacheReader, CacheWriter, load_json_bounded,
                                 verify_cache, zstd_content_size)
from stage2_student_distill.app.cli import main
from stage1_teacher_cache.pack import INDEX_NAME, pack_cache
from test_bad_images import _user_error, distill_inputs  # noqa: F401  (the distill fixture)

N, C, K, CLASSES, PER_SHARD = 10, 3, 2, 5, 4  # 3 shards: 4 + 4 + 2 images


def full_attrs() -> dict:
    """Attributes as complete as teacher-cache writes them, so that `cache info` can show a sound cache."""
    return {
        "manifest": {"hash": "ab" * 32, "num_images": N},
        "num_classes": CLASSES,
        "class_names": [f"c{i}" for i in range(CLASSES)],
        "teachers": [{"name": "t", "timm_name": "test_resnet", "weights": "file", "weights_sha256": "cd" * 32,
                      "params": 1000, "preprocess": {"input_size": 32, "interpolation": "bilinear",
                                                     "mean": [0.5] * 3, "std": [0.25] * 3, "crop_pct": 0.875}}],
        "ensemble": {"rule": "mean_softmax", "temperature": 1.0},
        "crops": {"num_crops": C, "seed": 0, "algorithm": "rrc", "scale": [0.08, 1.0], "ratio": [0.75, 1.33],
                  "flip_p": 0.5},
        "storage": {"k": K, "images_per_shard": PER_SHARD, "residual": "uniform", "index_dtype": "uint16",
                    "prob_dtype": "float16"},
        "created_at": "now",
    }


@pytest.fixture()
def sound(tmp_path) -> Path:
    """A complete, valid cache; each test copies or edits it."""
    writer = CacheWriter(tmp_path / "sound", full_attrs())
    rng = np.random.default_rng(0)
    for s in range(3):
        start, stop = writer.shard_range(s)
        probs = rng.dirichlet(np.ones(CLASSES), size=(stop - start, C))
        index = np.argsort(-probs, axis=-1)[..., :K]
        writer.write_shard(s, rng.integers(0, 50, size=(stop - start, C, 4)), rng.integers(0, 2, size=(stop - start, C)),
                           index, np.take_along_axis(probs, index, -1))
    return tmp_path / "sound"


def copy(cache: Path, name: str) -> Path:
    return Path(shutil.copytree(cache, cache.parent / name))


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail instead of hanging the suite (a FIFO read blocks forever)."""
    def expire(*_):
        raise TimeoutError(f"still running after {seconds} s")
    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def refused(*args: str) -> str:
    """Run `pipeline ARGS` in-process; it must exit 1 with one line and no traceback. Returns the line."""
    with deadline(60):
        return _user_error(CliRunner().invoke(main, list(args)))


def edit_json(path: Path, change) -> None:
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


def chunk_file(payload: bytes) -> bytes:
    """A chunk file as CacheWriter lays it out: the zstd frame followed by its crc32c (little-endian)."""
    return payload + google_crc32c.value(payload).to_bytes(4, "little")


# -- a. special files and oversized or bomb chunks


def _fifo(cache: Path, name: str) -> None:
    (cache / name).unlink()
    os.mkfifo(cache / name)


def _link_to_dev_zero(cache: Path, name: str) -> None:
    (cache / name).unlink()
    (cache / name).symlink_to("/dev/zero")


def _link_out_of_the_cache(cache: Path, name: str) -> None:
    outside = cache.parent / ("outside-" + name.replace("/", "-"))
    outside.write_bytes((cache / name).read_bytes())  # the same bytes: only the link itself is wrong
    (cache / name).unlink()
    (cache / name).symlink_to(outside)


def _directory(cache: Path, name: str) -> None:
    (cache / name).unlink()
    (cache / name).mkdir()


@pytest.mark.parametrize("name", ["zarr.json", "topk_prob/zarr.json", "topk_prob/c/0/0/0", "shard_record/c/1/0"])
@pytest.mark.parametrize("make,kind", [(_fifo, "a FIFO"), (_link_to_dev_zero, "a symbolic link"),
                                       (_link_out_of_the_cache, "a symbolic link"), (_directory, "a directory")],
                         ids=["fifo", "dev-zero", "link-out", "directory"])
def test_a_special_file_in_place_of_a_cache_file_is_refused_by_name(sound, name, make, kind):
    make(sound, name)
    for command in ("info", "verify"):
        line = refused("cache", command, str(sound))
        assert f"{name} is {kind}, not a regular file" in line, (command, line)
    assert f"{name} is {kind}" in refused("cache", "pack", str(sound), "--out", str(sound.parent / "p.tar"))


def test_a_zstd_bomb_chunk_is_refused_before_it_is_decoded(sound, distill_inputs):  # noqa: F811
    """A small frame that decodes to far more than the chunk's declared size (2 GB in the hand
    measurement; 32 MB here, for speed) is refused from its header, by shard, before decoding."""
    bomb = bytes(Zstd(level=3).encode(np.zeros(32 << 20, np.uint8)))
    assert len(bomb) < 4096 and zstd_content_size(bomb) == 32 << 20
    (sound / "topk_prob/c/1/0/0").write_bytes(chunk_file(bomb))
    expected = PER_SHARD * C * K * 2
    problems = verify_cache(sound)
    assert problems == [f"shard 1 array topk_prob: unreadable (ValueError: zstd frame declares 33,554,432 decoded "
                        f"bytes, the chunk holds {expected:,})"], problems
    with pytest.raises(CacheError, match=r"shard 1 \(images 4..7\) is damaged or unreadable \(ValueError: zstd frame "
                                         r"declares 33,554,432 decoded bytes"):
        CacheReader(sound).gather([5], [0])
    # and a frame that declares no size at all (streamed decoding would have no bound)
    frame = bytes(Zstd(level=3).encode(np.zeros(expected, np.uint8)))
    descriptor = frame[4]
    assert descriptor >> 5 & 1, "numcodecs writes single-segment frames with the content size"
    fcs = (1, 2, 4, 8)[descriptor >> 6]
    unsized = frame[:4] + bytes([descriptor & 0b00011111]) + bytes([(17) << 3]) + frame[5 + fcs:]
    assert zstd_content_size(unsized) is None
    (sound / "topk_prob/c/1/0/0").write_bytes(chunk_file(unsized))
    assert "zstd frame declares no decoded bytes" in verify_cache(sound)[0]


def test_a_chunk_file_larger_than_its_chunk_can_compress_to_is_refused_unread(sound):
    (sound / "boxes/c/2/0/0").write_bytes(os.urandom(1 << 20))
    for command in ("info", "verify"):
        line = refused("cache", command, str(sound))
        assert "boxes/c/2/0/0 is 1,048,576 bytes, more than a chunk of array boxes can occupy" in line, line


# -- b. declared sizes


def _declare_images(cache: Path, num_images: int, per_shard: int) -> None:
    """What the attacker did: N and every array's shape (and chunks) edited to match, ~5 KB of JSON."""
    shards = -(-num_images // per_shard)
    edit_json(cache / "zarr.json", lambda m: (m["attributes"]["manifest"].update(num_images=num_images),
                                              m["attributes"]["storage"].update(images_per_shard=per_shard)))
    for name in ("boxes", "flip", "topk_index", "topk_prob", "shard_record"):
        def change(m, name=name):
            m["shape"][0] = shards if name == "shard_record" else num_images
            if name != "shard_record":
                m["chunk_grid"]["configuration"]["chunk_shape"][0] = per_shard
        edit_json(cache / name / "zarr.json", change)


def test_a_declared_shard_count_over_the_limit_is_refused_before_any_shard_loop(sound):
    _declare_images(sound, 10**12, 1)
    for args in (["info", str(sound)], ["verify", str(sound)], ["pack", str(sound), "--out", str(sound) + ".tar"]):
        line = refused("cache", *args)
        assert "zarr.json: cache attribute 'manifest.num_images' = 1,000,000,000,000 is outside 0..2,147,483,647" in line
    _declare_images(sound, 10**9, 1)
    line = refused("cache", "info", str(sound))
    assert f"1,000,000,000 images at 1 per shard make 1,000,000,000 shards, over the {MAX_SHARDS:,}-shard limit" in line


def test_a_large_declared_shard_count_costs_what_is_on_disk(sound):
    """10**6 declared one-image shards, 3 record files on disk: the reader reads those 3 records,
    verify names the few it can and summarises the rest; a manifest of 10 images refuses it."""
    _declare_images(sound, 10**6, 1)
    reader = CacheReader(sound, require_complete=False)
    assert reader.layout.num_shards == 10**6 and int(reader.complete.sum()) == 3
    problems = verify_cache(sound)
    assert problems[-1] == "999,977 more incomplete shards (of 1,000,000; 3 complete), e.g. shard 23"
    # each array's chunk of the 3 complete shards holds 4 images, not the 1 now declared
    assert len(problems) == 3 * 4 + 20 + 1
    assert all("zstd frame declares" in p for p in problems[:12]), problems[:12]
    with pytest.raises(CacheError, match="zarr.json declares 1,000,000 images but the manifest has 10"):
        CacheReader(sound, manifest_hash="ab" * 32, manifest_images=10)


# -- c. values verify rejects are refused by distill too


MASS = "probability mass outside [0, 1] (NaN, infinite, negative or above 1)"


@pytest.mark.parametrize("prob,index,problem", [
    (np.nan, 0, MASS),
    (np.inf, 0, MASS),
    (0.9, 7, "class index outside 0..1 (num_classes 2)"),
], ids=["nan", "inf", "class-past-the-count"])
def test_distill_refuses_targets_that_verify_rejects(distill_inputs, prob, index, problem):  # noqa: F811
    cache = distill_inputs.write_cache(distill_inputs.inside)
    n = distill_inputs.manifest.num_images
    writer = CacheWriter(cache, CacheReader(cache).attrs)
    writer.write_shard(0, distill_inputs.inside, np.zeros((n, 2)), np.full((n, 2, 1), index), np.full((n, 2, 1), prob))
    assert verify_cache(cache) == [f"shard 0: {problem}"]
    line = _user_error(distill_inputs.distill("torch"))
    assert f"{cache}: shard 0 (images 0..5): {problem}" in line, line
    assert f"run `pipeline cache verify --repair {cache}`, then rerun the command that wrote the cache" in line


# -- d. attributes of the wrong type or value, deep JSON, hostile packs: one line naming the key


def _set_attr(dotted: str, value):
    def change(meta):
        *parents, last = dotted.split(".")
        node = meta["attributes"]
        for part in parents:
            node = node[part]
        node[last] = value
    return change


def _nested(depth: int):
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


HOSTILE_ATTRS = {
    "infinite-images": (_set_attr("manifest.num_images", float("inf")), "'manifest.num_images' = inf must be int"),
    "growing-yes": (_set_attr("growing", "yes"), "'growing' = 'yes' must be dict"),
    "hash-a-number": (_set_attr("manifest.hash", 12345), "'manifest.hash' = 12345 must be str"),
    "version-true": (_set_attr("version", True), "'version' = True must be an integer"),
    "k-over-classes": (_set_attr("storage.k", 6), "'storage.k' = 6 is outside 1..5"),
    "teacher-not-an-object": (_set_attr("teachers", ["t"]), "'teachers[0]' = 't' must be an object with a string"),
    "deep-json": (_set_attr("note", _nested(200)), "zarr.json: JSON nested deeper than 32 levels"),
}


@pytest.mark.parametrize("case", list(HOSTILE_ATTRS))
def test_malformed_attributes_are_one_line_naming_the_key_in_every_command(sound, case):
    change, named = HOSTILE_ATTRS[case]
    other = copy(sound, "other")  # a sound partner for merge
    meta = sound / "zarr.json"
    if case == "deep-json":  # json.dumps would recurse too: write the text
        edit_json(meta, _set_attr("note", 0))
        meta.write_text(meta.read_text().replace('"note": 0', '"note": ' + "[" * 200 + "]" * 200))
    else:
        edit_json(meta, change)
    for args in (["info", str(sound)], ["verify", str(sound)], ["pack", str(sound), "--out", str(sound) + ".tar"],
                 ["merge", str(other), str(sound), "--out", str(sound.parent / "merged")]):
        line = refused("cache", *args)
        assert named in line and str(sound) in line, (args, line)


def test_json_nested_past_the_interpreters_limit_is_refused_without_recursion_error(sound):
    meta = sound / "topk_index" / "zarr.json"
    meta.write_text(meta.read_text()[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    line = refused("cache", "info", str(sound))
    assert "topk_index/zarr.json: not valid JSON (RecursionError" in line, line
    with pytest.raises(CacheError, match="nested deeper than 32 levels"):
        load_json_bounded(b"[" * 40 + b"]" * 40, "x")


def _pack_with(sound: Path, out: Path, member: str | None = None, index: bytes | None = None) -> Path:
    """A pack of ``sound`` with one extra member named ``member``, or its index replaced by ``index``."""
    pack = sound.parent / "sound.tar"
    if not pack.exists():
        pack_cache(str(sound), str(pack))
    with tarfile.open(pack) as src, tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as dst:
        for m in src:
            data = src.extractfile(m).read()
            if m.name == INDEX_NAME and index is not None:
                data = index
                m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
        if member is not None:
            info = tarfile.TarInfo(member)
            info.size = 1
            dst.addfile(info, io.BytesIO(b"x"))
    return out


def test_unpack_refuses_too_deep_members_and_a_too_deep_index(sound, tmp_path):
    deep = _pack_with(sound, tmp_path / "deep.tar", member="/".join(["d"] * 2000) + "/f")
    line = refused("cache", "unpack", str(deep), "--out", str(tmp_path / "u1"))
    assert "member 'd/d/d" in line and "is nested 2001 levels deep, deeper than any cache file" in line, line
    nested = _pack_with(sound, tmp_path / "nested.tar", index=b"[" * 100_000 + b"]" * 100_000)
    line = refused("cache", "unpack", str(nested), "--out", str(tmp_path / "u2"))
    assert f"{INDEX_NAME}: not valid JSON (RecursionError" in line, line
    shallow = _pack_with(sound, tmp_path / "shallow.tar", index=b'{"format": ' + b"[" * 50 + b"]" * 50 + b"}")
    line = refused("cache", "unpack", str(shallow), "--out", str(tmp_path / "u3"))
    assert f"{INDEX_NAME}: JSON nested deeper than 32 levels" in line, line
    assert not (tmp_path / "u1").exists() and not (tmp_path / "u2").exists() and not (tmp_path / "u3").exists()


def test_a_cache_tree_deeper_than_any_cache_is_refused_by_name(sound):
    deep = sound.joinpath(*["d"] * 20)
    deep.mkdir(parents=True)
    line = refused("cache", "info", str(sound))
    assert "d/d/d/d/d/d/d/d is nested deeper than any cache's files (8 levels)" in line, line


# -- e. array metadata the writer never writes


@pytest.mark.parametrize("change,named", [
    (lambda m: m.update(storage_transformers=[{"name": "offset", "configuration": {}}]),
     "topk_prob/zarr.json declares storage_transformers"),
    (lambda m: m.update(fill_value=7), "topk_prob/zarr.json has fill_value 7.0; this tool writes 0"),
    (lambda m: m.update(codecs=[c for c in m["codecs"] if c["name"] != "crc32c"]),
     "array topk_prob has codecs ['bytes', 'zstd']"),
], ids=["storage-transformers", "fill-value", "codec-chain"])
def test_array_metadata_other_than_the_writers_is_refused(sound, change, named):
    edit_json(sound / "topk_prob" / "zarr.json", change)
    assert named in refused("cache", "verify", str(sound))


def test_the_sound_cache_passes_every_command(sound, tmp_path):
    """The hostile cases above fail for what was broken, not because the fixture is unreadable."""
    runner = CliRunner()
    for args in (["info", str(sound)], ["verify", str(sound)], ["pack", str(sound), "--out", str(tmp_path / "p.tar")]):
        result = runner.invoke(main, ["cache", *args])
        assert result.exit_code == 0, (args, result.output)
    result = runner.invoke(main, ["cache", "unpack", str(tmp_path / "p.tar"), "--out", str(tmp_path / "u")])
    assert result.exit_code == 0 and verify_cache(tmp_path / "u") == [], result.output
