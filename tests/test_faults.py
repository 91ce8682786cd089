"""Faults while building a cache: kill -9, disk full, two writers, damaged shards and --repair.

The long kill campaign (>= 20 random kills) is tests/fault_kill_resume.py, run by hand;
its result is recorded in docs/reliability.md.
"""
from __future__ import annotations

import errno
import itertools
import shutil
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from common.cache_format import CacheError, CacheReader, CacheWriter, verify_cache
from stage2_student_distill.app.cli import main
from fault_kill_resume import Writer, run_trials
from stage1_fixtures import config, dataset, overrides  # noqa: F401
from stage1_teacher_cache.run import run

ARRAYS = ("boxes", "flip", "topk_index", "topk_prob")


def read_all(path) -> dict[str, np.ndarray]:
    reader = CacheReader(path)
    return {name: np.asarray(reader.arrays[name][:]) for name in ARRAYS}


def assert_same(a, b) -> None:
    got, want = read_all(a), read_all(b)
    for name in ARRAYS:
        assert np.array_equal(got[name], want[name]), name


@pytest.fixture(scope="module")
def reference(dataset):  # noqa: F811
    """Uninterrupted in-process run (shards of 4: 3 shards), for the in-process fault tests."""
    out = dataset["tmp"] / "faults-reference"
    run(config(dataset["train"], out))
    return out


@pytest.fixture(scope="module")
def forked_reference(dataset):  # noqa: F811
    """Uninterrupted run in a forked single-threaded child, for the forked-writer tests."""
    out = dataset["tmp"] / "faults-forked-reference"
    assert Writer("fork", overrides(dataset["train"], out), dataset["tmp"]).wait() == 0
    return out


def test_kill_9_twice_at_random_moments_then_resume(tmp_path):
    result = run_trials(tmp_path, "fork", kills=2, kills_per_trial=2, images=12, images_per_shard=2, seed=1,
                        max_trials=1)
    assert result.kills + result.finished_before_kill == 2
    assert result.failures == [], result.summary()


def test_a_crash_while_creating_leaves_no_half_made_cache(dataset, reference, tmp_path, monkeypatch):  # noqa: F811
    create = CacheWriter._create

    def crash_before_attributes(self, group, attrs):
        create(self, group, {})  # arrays exist, attributes do not: where a kill would leave it
        raise RuntimeError("killed")

    monkeypatch.setattr(CacheWriter, "_create", crash_before_attributes)
    out = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="killed"):
        run(config(dataset["train"], out))
    assert not out.exists()  # built beside it and renamed into place only when whole
    monkeypatch.undo()
    run(config(dataset["train"], out))
    assert_same(out, reference)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_write_one_cache_like_torchrun(dataset, forked_reference, tmp_path):  # noqa: F811
    out = tmp_path / "cache"
    port = str(_free_port())
    ranks = [Writer("fork", overrides(dataset["train"], out), tmp_path,
                    env={"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                         "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}) for r in range(2)]
    assert [w.wait(timeout=120) for w in ranks] == [0, 0]
    assert CacheReader(out).attrs["compute"]["world_size"] == 2
    assert verify_cache(out) == []
    assert_same(out, forked_reference)


def test_the_same_command_launched_twice_at_once_is_harmless(dataset, forked_reference, tmp_path):  # noqa: F811
    """Two independent single-process runs both compute every shard; each chunk is replaced
    atomically with identical bytes, so the result is the single run's."""
    out = tmp_path / "cache"
    first = Writer("fork", overrides(dataset["train"], out), tmp_path)
    while not (out / "zarr.json").exists() and first.running():
        pass  # the second would otherwise race the creation, which it reports rather than corrupts
    second = Writer("fork", overrides(dataset["train"], out), tmp_path)
    assert [first.wait(timeout=120), second.wait(timeout=120)] == [0, 0]
    assert verify_cache(out) == []
    assert_same(out, forked_reference)


def _check_disk_full(error: CacheError, out: Path, failed_shard: int) -> None:
    message = str(error)
    assert "disk full" in message and f"shard {failed_shard} is not marked complete" in message
    assert "rerun the same command to resume" in message
    complete = CacheReader(out, require_complete=False).complete
    assert complete.tolist()[:failed_shard] == [True] * failed_shard and not complete[failed_shard]
    # nothing marked complete is damaged: the only problems are the unfinished shards
    assert all("incomplete" in p for p in verify_cache(out))


def test_disk_full_simulated(dataset, reference, tmp_path, monkeypatch):  # noqa: F811
    write = zarr.Array.__setitem__
    calls = itertools.count()

    def enospc_on_the_seventh_write(self, key, value):  # 5 writes per shard: shard 1's second array
        if next(calls) == 6:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(self, key, value)

    out = tmp_path / "cache"
    monkeypatch.setattr(zarr.Array, "__setitem__", enospc_on_the_seventh_write)
    with pytest.raises(CacheError) as err:
        run(config(dataset["train"], out))
    monkeypatch.undo()
    _check_disk_full(err.value, out, failed_shard=1)
    summary = run(config(dataset["train"], out))
    assert summary["shards_written"] == 2 and verify_cache(out) == []
    assert_same(out, reference)


def _mount_tmpfs(path: Path, size: str, remount: bool = False) -> bool:
    options = f"remount,size={size}" if remount else f"size={size}"
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode == 0


def test_disk_full_on_a_real_small_filesystem(dataset, tmp_path):  # noqa: F811
    settings = {"teacher_cache.images_per_shard": 2}  # 5 shards of 5 tiny files: one 4 KiB page each
    reference = tmp_path / "reference"
    run(config(dataset["train"], reference, **settings))
    pages = lambda f: -(-f.stat().st_size // 4096)  # noqa: E731  (tmpfs allocates whole pages)
    metadata = sum(pages(f) for f in reference.rglob("zarr.json"))
    # room for the metadata (+1 page for the temp file of an atomic rewrite) and 2.4 shards: shard 2 fails
    size_kib = 4 * (metadata + 1 + 12)
    small = tmp_path / "small"
    small.mkdir()
    if not _mount_tmpfs(small, f"{size_kib}k"):
        pytest.skip("cannot mount a tmpfs here (needs root); test_disk_full_simulated covers the logic")
    try:
        out = small / "cache"
        with pytest.raises(CacheError) as err:
            run(config(dataset["train"], out, **settings))
        _check_disk_full(err.value, out, failed_shard=2)
        assert _mount_tmpfs(small, "4m", remount=True)
        summary = run(config(dataset["train"], out, **settings))
        assert summary["shards_written"] == 3 and verify_cache(out) == []
        assert_same(out, reference)
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_verify_repair_resets_damaged_shards_and_the_rerun_recomputes_them(dataset, reference, tmp_path):  # noqa: F811
    cache = tmp_path / "cache"
    shutil.copytree(reference, cache)
    chunk = cache / "topk_prob" / "c" / "1" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x04
    chunk.write_bytes(bytes(data))

    runner = CliRunner()
    result = runner.invoke(main, ["cache", "verify", str(cache), "--repair"])
    assert result.exit_code == 1 and "shard 1 array topk_prob" in result.output, result.output
    assert "reset the completion record of shard(s) [1]" in result.output
    assert verify_cache(cache) == ["shard 1 (images 4..7): incomplete (no completion record)"]

    summary = run(config(dataset["train"], cache))
    assert summary["shards_written"] == 1 and summary["shards_skipped"] == 2
    assert verify_cache(cache) == []
    assert_same(cache, reference)
    again = runner.invoke(main, ["cache", "verify", str(cache), "--repair"])
    assert again.exit_code == 0 and again.output.startswith("OK:"), again.output


def test_merge_and_reuse_refuse_a_damaged_source(dataset, reference, tmp_path):  # noqa: F811
    """Tools that copy a cache verify each shard's checksum: damage is refused, not propagated."""
    cache = tmp_path / "damaged"
    shutil.copytree(reference, cache)
    zarr.open_group(str(cache), mode="r+")["topk_prob"][0:1] = 0.25  # valid chunk, wrong content
    with pytest.raises(CacheError, match="shard 0 array topk_prob: checksum mismatch"):
        run(config(dataset["train"], tmp_path / "new", **{"teacher_cache.teachers": ["test_resnet"],
                                                         "teacher_cache.input_sizes": ["test_resnet=32"]}),
            reuse_crops=str(cache))
