"""common.locations: the one rule for paths vs URLs, and what a missing fsspec backend says."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from click.testing import CliRunner

from stage2_student_distill.app.cli import main
from common.cache_format import cache_files
from common.locations import LocationError, absolute, filesystem, is_url, local_path, read_bytes, scheme, write_bytes


def test_paths_and_urls_are_told_apart_by_one_rule(tmp_path):
    assert [scheme(x) for x in ("s3://b/k", "GS://b", "file:///tmp/x", "relative/dir", tmp_path)] == ["s3", "gs", "file", "", ""]
    assert local_path((tmp_path / "a b").as_uri()) == tmp_path / "a b"  # percent-decoded
    assert local_path("cache") == Path("cache") and local_path("memory://x/y") is None
    assert is_url("memory://x") and not is_url(tmp_path)
    assert absolute("s3://b/m.parquet") == "s3://b/m.parquet"
    assert absolute("m.parquet") == str(Path.cwd() / "m.parquet")


def test_whole_file_writes_and_listings_agree_locally_and_remotely(tmp_path):
    files = {"zarr.json": b"{}", "x/c/0": b"12345", "x/c/1": b""}
    for root in (str(tmp_path / "cache"), "memory://locations-test/cache"):
        for name, data in files.items():
            write_bytes(f"{root}/{name}", data)
        assert cache_files(root) == {name: len(data) for name, data in sorted(files.items())}, root
        assert read_bytes(f"{root}/x/c/0") == b"12345"
    assert not list((tmp_path / "cache").rglob("*.tmp"))  # local writes go through temp + rename


@pytest.mark.skipif(importlib.util.find_spec("gcsfs") is not None, reason="gcsfs is installed here")
def test_a_missing_backend_is_one_line_naming_the_extra():
    with pytest.raises(LocationError, match=r"pip install 'mealv2-pipeline\[gcs\]'"):
        filesystem("gs://bucket/cache")
    for args in (["cache", "info", "gs://bucket/cache"], ["manifest", "info", "gs://bucket/m.parquet"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
        assert result.output.count("\n") == 1 and "mealv2-pipeline[gcs]" in result.output, result.output



def test_outputs_that_must_be_local_refuse_urls_instead_of_making_a_folder_named_s3(tmp_path, monkeypatch):
    from stage2_student_distill.checkpoint import prepare_run_dir

    monkeypatch.chdir(tmp_path)
    with pytest.raises(LocationError, match="a run directory .* must be a local path"):
        prepare_run_dir("s3://bucket/run", {}, resume=False, tables=(), write=True)
    result = CliRunner().invoke(main, ["cache", "pack", "memory://nothing", "--out", "s3://bucket/c.tar"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "the pack file must be a local path" in result.output and result.output.count("\n") == 1, result.output
    assert not (tmp_path / "s3:").exists()
