"""User errors keep their cause, and one error type reaches the user from any thread or process.

Each failure here used to be reported under the wrong name ("could not fetch", "unsafe",
"incomplete") with its cause dropped, or to escape as a traceback.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click
import numpy as np
import pytest
import timm
import torch
from torch.utils.data import DataLoader, Dataset

import common.models
from common.cache_format import RECORD_ARRAY, CacheError, CacheReader, CacheWriter, repair_cache, verify_cache
from common.cli_support import user_errors
from common.config import ConfigError
from common.errors import PipelineError
from common.images import ImageError
from common.models import WeightsError, create_model, read_weights
from test_cache_format import attrs, build, shard_arrays

REPO = Path(__file__).resolve().parent.parent


# -- pretrained weights: a download failure is not a broken file, and both keep the cause


def _failing_create_model(error: Exception):
    real = timm.create_model

    def create(name, pretrained=False, **kwargs):
        if pretrained:
            raise error
        return real(name, pretrained=False, **kwargs)

    return create


def test_a_pretrained_weights_failure_that_is_not_a_download_is_not_called_one(monkeypatch):
    damaged = RuntimeError("PytorchStreamReader failed reading zip archive: failed finding central directory")
    monkeypatch.setattr(common.models.timm, "create_model", _failing_create_model(damaged))
    with pytest.raises(WeightsError) as err:
        create_model("test_resnet", 3, pretrained=True)
    message = str(err.value)
    assert "could not fetch" not in message
    assert "RuntimeError: PytorchStreamReader failed reading zip archive" in message
    assert "delete it to download it again" in message and "--teacher-weights test_resnet=PATH" in message
    assert err.value.__cause__ is damaged


def test_a_failed_download_says_so_and_keeps_the_cause(monkeypatch):
    offline = ConnectionError("[Errno -2] Name or service not known")
    monkeypatch.setattr(common.models.timm, "create_model", _failing_create_model(offline))
    with pytest.raises(WeightsError) as err:
        create_model("test_resnet", 3, pretrained=True)
    assert "could not fetch pretrained weights for 'test_resnet'" in str(err.value)
    assert "ConnectionError: [Errno -2] Name or service not known" in str(err.value)
    assert err.value.__cause__ is offline


# -- torch.load: refused code is "unsafe", a damaged file is "unreadable"


def test_a_truncated_checkpoint_is_unreadable_not_unsafe(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"w": torch.zeros(3)}, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:100])
    with pytest.raises(WeightsError) as err:
        read_weights(truncated)
    message = str(err.value)
    assert "safely" not in message
    assert message.startswith(f"{truncated}: cannot be read as a torch file (RuntimeError: PytorchStreamReader")
    assert isinstance(err.value.__cause__, RuntimeError)


def test_pickled_code_is_unsafe_and_names_the_refused_global(tmp_path):
    path = tmp_path / "code.pt"
    torch.save({"layer": torch.nn.Linear(2, 2)}, path)
    with pytest.raises(WeightsError) as err:
        read_weights(path)
    # the global the unpickler refused, named in a complete sentence
    assert str(err.value) == (f"{path}: cannot be loaded safely: it holds the Python object "
                              "torch.nn.modules.linear.Linear, not only tensors, and loading it could run code. "
                              "Only safetensors files and plain tensor state dicts are accepted.")
    assert err.value.__cause__ is not None


# -- shard records: "incomplete" (absent / not done) is not "unreadable" (a read that failed)


def _damage_record_chunk(cache: Path, shard: int) -> None:
    chunk = cache / RECORD_ARRAY / "c" / str(shard) / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF  # the chunk's CRC32C no longer matches: zarr raises on read
    chunk.write_bytes(bytes(data))


def test_an_unreadable_record_stops_reader_and_writer_instead_of_meaning_recompute(tmp_path):
    cache = tmp_path / "c"
    build(cache)
    _damage_record_chunk(cache, 1)
    with pytest.raises(CacheError, match=r"cannot read the completion record of shard\(s\) \[1\]") as err:
        CacheReader(cache)
    assert "incomplete" not in str(err.value) and err.value.__cause__ is not None
    with pytest.raises(CacheError, match=r"completion record of shard\(s\) \[1\]"):
        CacheWriter(cache, attrs()).complete_shards()  # what stage 1 consults to skip finished shards
    # verify names it; --repair rewrites it as "incomplete", and only then is the shard recomputed
    assert [p for p in verify_cache(cache) if "record unreadable" in p][0].startswith("shard 1: completion record")
    problems, reset = repair_cache(cache)
    assert reset == [1]
    writer = CacheWriter(cache, attrs())
    assert writer.complete_shards().tolist() == [True, False, True]
    writer.write_shard(1, *shard_arrays(writer, 1))
    assert verify_cache(cache) == []


class _FlakyRecords:
    """A record array on a store whose reads fail for a while (an object-store hiccup)."""

    def __init__(self, arr):
        self.shape = arr.shape

    def __getitem__(self, key):
        raise ConnectionError("connection reset by peer")


def test_a_transient_store_error_on_records_raises_and_names_it(tmp_path):
    writer = build(tmp_path / "c")
    writer.arrays[RECORD_ARRAY] = _FlakyRecords(writer.arrays[RECORD_ARRAY])
    with pytest.raises(CacheError, match="ConnectionError: connection reset by peer") as err:
        writer.complete_shards()
    assert "rerun" in str(err.value)


def test_a_missing_record_is_still_incomplete(tmp_path):
    build(tmp_path / "c", shards=(0, 2))
    assert CacheReader(tmp_path / "c", require_complete=False).complete.tolist() == [True, False, True]


def test_an_unreadable_shard_keeps_its_cause(tmp_path):
    cache = tmp_path / "c"
    build(cache)
    chunk = cache / "topk_prob" / "c" / "1" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:-3])
    with pytest.raises(CacheError, match="shard 1 .* damaged or unreadable") as err:
        CacheReader(cache).read_shard(1)
    assert err.value.__cause__ is not None


# -- one user error type, whole across a DataLoader worker process


class _BadImages(Dataset):
    def __init__(self, error: Exception):
        self.error = error

    def __len__(self):
        return 2

    def __getitem__(self, i):
        raise self.error


@pytest.mark.parametrize("error, expected", [
    # two constructor arguments: torch re-raises it as a RuntimeError carrying the traceback text
    (ImageError("data/a/x.png", "truncated or corrupt image"), "data/a/x.png: truncated or corrupt image"),
    # one argument: torch keeps the type, but the message becomes the worker's traceback
    (ConfigError("config key 'optim.lr' = 0: must be > 0"), "config key 'optim.lr' = 0: must be > 0"),
])
def test_a_user_error_in_a_dataloader_worker_reaches_the_user_as_its_message(error, expected):
    loader = DataLoader(_BadImages(error), batch_size=1, num_workers=1)
    with pytest.raises(click.ClickException) as err:
        with user_errors():
            next(iter(loader))
    assert err.value.message == expected


def test_a_bug_in_a_worker_keeps_its_traceback():
    loader = DataLoader(_BadImages(ZeroDivisionError("bug")), batch_size=1, num_workers=1)
    with pytest.raises(ZeroDivisionError):
        with user_errors():
            next(iter(loader))


def test_every_project_error_type_is_a_pipeline_error():
    import data_manifests.build
    import stage1_teacher_cache.evaluate
    import stage1_teacher_cache.pack
    import stage2_student_distill.checkpoint
    import stage2_student_distill.export
    import stage2_student_distill.hub
    import stage2_student_distill.predict
    from common.manifest import ManifestError

    for cls in (ConfigError, CacheError, ImageError, WeightsError, ManifestError,
                data_manifests.build.ManifestBuildError, stage1_teacher_cache.evaluate.TeacherCheckError,
                stage1_teacher_cache.pack.PackError, stage2_student_distill.checkpoint.RunError,
                stage2_student_distill.export.ExportError, stage2_student_distill.hub.HubError,
                stage2_student_distill.predict.PredictError):
        assert issubclass(cls, PipelineError), cls


# -- a command whose optional module is missing explains itself instead of vanishing


def test_demo_without_its_module_says_why_when_run():
    code = (  # as if stage2_student_distill.app.demo needed a module that is not installed
        "import sys\n"
        "class Missing:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'stage2_student_distill.app.demo':\n"
        "            raise ModuleNotFoundError(\"No module named 'plotlib'\", name='plotlib')\n"
        "sys.meta_path.insert(0, Missing())\n"
        "from stage2_student_distill.app.cli import main; main(['demo'])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO)
    assert result.returncode == 1, result.stderr
    assert ("`pipeline demo` cannot run here: ModuleNotFoundError: No module named 'plotlib'; "
            "install the missing module (plotlib)") in result.stderr
    assert "Traceback" not in result.stderr


# -- DALI's errors name no file: the renderer names it (stage 1's path; stage 2's is in test_bad_images)


def test_a_dali_decode_failure_names_the_file(tmp_path):
    from stage2_student_distill.loaders import dali_available

    if not dali_available():
        pytest.skip("nvidia-dali is not installed")
    from PIL import Image

    from common.dali_crops import DaliCropRenderer
    from common.render import View

    rng = np.random.default_rng(0)
    good, bad = tmp_path / "good.jpg", tmp_path / "bad.jpg"
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(good)
    bad.write_bytes(good.read_bytes()[:200])  # truncated after the manifest was built
    renderer = DaliCropRenderer([View(16, "bilinear")], batch_size=2, num_threads=1)
    with pytest.raises(ImageError) as err:
        renderer([str(good), str(bad)], [[[0, 0, 10, 10], [0, 0, 10, 10]]], [0, 0])
    assert str(err.value).startswith(f"{bad}: ") and "truncated or corrupt image" in str(err.value)
    assert isinstance(err.value.__cause__, RuntimeError)  # DALI's own error, kept


def test_a_truncated_safetensors_file_is_named_with_its_cause(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"w": torch.zeros(64)}, str(path))
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(WeightsError, match=r"w\.safetensors: cannot be read as a safetensors file \(\w+") as err:
        read_weights(path)
    assert err.value.__cause__ is not None
