"""Hostile uploads and checkpoint metadata (issue #26): refused cheaply, before any decode or model build,
with one line that names the file and the key.

Uploads go through the Flask test client (as tests/test_serve.py); checkpoints through the real commands
(`pipeline predict`, `pipeline evaluate`, `pipeline export`, `pipeline serve`) with click's CliRunner.
"""
from __future__ import annotations

import functools
import io
import re
import socket
import struct
import zlib
from pathlib import Path

import pytest
import timm
import torch
from click.testing import CliRunner
from PIL import Image, ImageFile

from stage2_student_distill.app.cli import main
from common.models import WeightsError, create_model, read_weights
from stage2_student_distill.hub import meal_v2_checkpoint
from tests.serve_fixtures import create_app, inputs, png_bytes, served  # noqa: F401
from tests.stage1_fixtures import CLASSES, make_manifest
from tests.test_serve import _error, _upload

PRE = {"input_size": 32, "interpolation": "bilinear", "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
       "crop_pct": 0.875}


def _meta() -> dict:
    """What `pipeline train` writes to RUN/best.pt for a 3-class test_resnet."""
    return {"kind": "train", "model": "test_resnet", "num_classes": len(CLASSES), "class_names": list(CLASSES),
            "preprocess": dict(PRE), "manifest_hash": "0" * 64}


@functools.cache
def _state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return timm.create_model("test_resnet", num_classes=len(CLASSES)).state_dict()


def _write(path: Path, meta) -> Path:
    torch.save({"model": _state(), "meta": meta}, path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("hostile")
    image = tmp / "photo.png"
    image.write_bytes(png_bytes(48, 40))
    return {"tmp": tmp, "good": _write(tmp / "good.pt", _meta()), "image": image,
            "manifest": make_manifest(tmp, "val", sizes=[(40, 30), (57, 64), (33, 80)])}


def _cli(*args) -> "click.testing.Result":  # noqa: F821
    return CliRunner().invoke(main, [str(a) for a in args])


def _commands(files: dict, ckpt: Path, tmp: Path) -> dict[str, list]:
    return {
        "predict": ["predict", files["image"], "--checkpoint", ckpt, "--device", "cpu"],
        "evaluate": ["evaluate", "--checkpoint", ckpt, "--manifest", files["manifest"], "--device", "cpu",
                     "--loader", "torch", "--num-workers", "0"],
        "export": ["export", "--checkpoint", ckpt, "--out", tmp / "model.safetensors"],
        "serve": ["serve", "--checkpoint", ckpt, "--port", "0", "--device", "cpu"],
    }


# ------------------------------------------------------------------------------------- checkpoint metadata

def _edit(key: str, value):
    """A function that sets the dotted ``key`` of a fresh meta to ``value`` (``"meta"``: the whole meta)."""
    def edited():
        if key == "meta":
            return value
        meta = _meta()
        table, _, sub = key.partition(".")
        if sub:
            meta[table][sub] = value
        else:
            meta[table] = value
        return meta
    return edited


# (case id, the key the message must name, edited meta)
HOSTILE_META = [
    ("hub-prefix", "model", _edit("model", "hf-hub:timm/resnet50.a1_in1k")),
    ("hub-underscore", "model", _edit("model", "hf_hub:timm/resnet50")),
    ("org-path", "model", _edit("model", "timm/test_resnet")),
    ("local-dir", "model", _edit("model", "local-dir:/etc")),
    ("unknown-arch", "model", _edit("model", "no_such_net")),
    ("unknown-tag", "model", _edit("model", "test_resnet.no_such_tag")),
    ("model-not-str", "model", _edit("model", ["test_resnet"])),
    ("huge-input", "preprocess.input_size", _edit("preprocess.input_size", 30000)),
    ("zero-input", "preprocess.input_size", _edit("preprocess.input_size", 0)),
    ("float-input", "preprocess.input_size", _edit("preprocess.input_size", 32.0)),
    ("huge-classes", "num_classes", _edit("num_classes", 10**8)),
    ("str-classes", "num_classes", _edit("num_classes", "3")),
    ("bool-classes", "num_classes", _edit("num_classes", True)),
    ("classes-not-the-classifier", "num_classes", lambda: {**_meta(), "num_classes": 5, "class_names": list("abcde")}),
    ("names-count", "class_names", _edit("class_names", ["ant", "bee"])),
    ("names-not-str", "class_names", _edit("class_names", [1, 2, 3])),
    ("std-zero", "preprocess.std", _edit("preprocess.std", [0.25, 0.0, 0.25])),
    ("std-two", "preprocess.std", _edit("preprocess.std", [0.25, 0.25])),
    ("mean-str", "preprocess.mean", _edit("preprocess.mean", "0.5")),
    ("mean-nan", "preprocess.mean", _edit("preprocess.mean", [0.5, float("nan"), 0.5])),
    ("crop-zero", "preprocess.crop_pct", _edit("preprocess.crop_pct", 0.0)),
    ("interpolation", "preprocess.interpolation", _edit("preprocess.interpolation", "lanczos9")),
    ("preprocess-missing-key", "preprocess.std", lambda: {**_meta(), "preprocess": {k: v for k, v in PRE.items()
                                                                                     if k != "std"}}),
    ("meta-not-a-table", "meta", _edit("meta", [1, 2])),
]


@pytest.fixture
def no_model_no_network(monkeypatch):
    """Fails the test if a model is built, a hub file is fetched or a socket connects."""
    _state()  # the checkpoints' own weights are built before the guard
    calls = []

    def refuse(what):
        def called(*args, **kwargs):
            calls.append(what)
            raise AssertionError(f"{what} called while reading a hostile checkpoint")
        return called

    monkeypatch.setattr(timm, "create_model", refuse("timm.create_model"))
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse("hf_hub_download"))
    monkeypatch.setattr(timm.models._hub, "hf_hub_download", refuse("timm hf_hub_download"), raising=False)
    monkeypatch.setattr(socket.socket, "connect", refuse("socket.connect"))
    return calls


@pytest.mark.parametrize("command", ["predict", "evaluate", "export", "serve"])
@pytest.mark.parametrize("case,key,meta", HOSTILE_META, ids=[c[0] for c in HOSTILE_META])
def test_hostile_metadata_is_one_line_naming_file_and_key(files, tmp_path, no_model_no_network, command, case,
                                                          key, meta):
    ckpt = _write(tmp_path / f"{case}.pt", meta())
    result = _cli(*_commands(files, ckpt, tmp_path)[command])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert lines[0].startswith(f"Error: {ckpt}: metadata key '{key}' "), lines[0]
    assert no_model_no_network == []  # refused before any model was built or anything fetched
    assert not (tmp_path / "model.safetensors").exists()


@pytest.mark.parametrize("case,key,meta", HOSTILE_META, ids=[c[0] for c in HOSTILE_META])
def test_every_other_reader_of_weights_refuses_it_too(tmp_path, no_model_no_network, case, key, meta):
    """The hub entry point and --teacher-weights/--student-weights (create_model) share the one check."""
    ckpt = _write(tmp_path / f"{case}.pt", meta())
    for read in (lambda: meal_v2_checkpoint(ckpt), lambda: create_model("test_resnet", 3, weights=ckpt)):
        with pytest.raises(WeightsError, match=rf"^{re.escape(str(ckpt))}: metadata key '{re.escape(key)}' "):
            read()
    assert no_model_no_network == []


def test_the_checkpoints_this_project_writes_stay_readable(files, tmp_path):
    """A train checkpoint predicts, evaluates and exports; the export (other meta keys) predicts too."""
    commands = _commands(files, files["good"], tmp_path)
    for name in ("predict", "evaluate", "export"):
        result = _cli(*commands[name])
        assert result.exit_code == 0, result.output
    assert "input 32px" in result.output
    exported = tmp_path / "model.safetensors"
    assert read_weights(exported)[1]["export_format"] == "safetensors"
    result = _cli("predict", files["image"], "--checkpoint", exported, "--device", "cpu")
    assert result.exit_code == 0 and result.output.count("%") == 3, result.output  # top-3 of 3 classes
    # a weights tag recorded by `pipeline distill` for a timm name (resolve_name keeps it)
    _write(tmp_path / "tagged.pt", {**_meta(), "model": "test_resnet.r160_in1k"})
    assert read_weights(tmp_path / "tagged.pt")[1]["model"] == "test_resnet.r160_in1k"


def test_std_zero_cannot_reach_training(tmp_path):
    """--student-weights / --teacher-weights with std 0 would divide the pixels by zero: refused at read."""
    ckpt = _write(tmp_path / "std0.pt", _edit("preprocess.std", [0, 0, 0])())
    with pytest.raises(WeightsError, match=r"metadata key 'preprocess.std' is \[0, 0, 0\]; every value must be > 0"):
        create_model("test_resnet", 3, weights=ckpt)


# ------------------------------------------------------------------------------------- unsafe pickles

def test_unsafe_checkpoint_names_the_refused_global_in_a_sentence(files, tmp_path):
    ckpt = tmp_path / "code.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "meta": {"hook": torch.nn.ReLU()}}, ckpt)
    result = _cli("predict", files["image"], "--checkpoint", ckpt, "--device", "cpu")
    assert result.exit_code == 1
    (line,) = result.output.strip().splitlines()
    assert line == (f"Error: {ckpt}: cannot be loaded safely: it holds the Python object "
                    "torch.nn.modules.activation.ReLU, not only tensors, and loading it could run code. "
                    "Only safetensors files and plain tensor state dicts are accepted.")


# ------------------------------------------------------------------------------------- uploads

def _png_claiming(width: int, height: int) -> bytes:
    """A 419-byte-class PNG whose IHDR declares width x height: a real 8x8 PNG with the header patched.

    IHDR is the first chunk: 8-byte signature, length, b"IHDR", width, height (big-endian), 5 more bytes, CRC.
    """
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


@pytest.fixture(scope="module")
def predict_only(tmp_path_factory):
    from tests.serve_fixtures import write_checkpoint

    ckpt = tmp_path_factory.mktemp("serve-hostile") / "best.pt"
    write_checkpoint(ckpt)
    return ckpt


def _app(ckpt: Path, **kw):
    from stage2_student_distill.app.serve.app import Served

    return create_app(Served(checkpoint=ckpt, **kw))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_the_crafted_png_declares_144_megapixels():
    with Image.open(io.BytesIO(_png_claiming(12000, 12000))) as img:
        assert img.size == (12000, 12000) and img.mode == "RGB"


def test_a_144_megapixel_png_is_refused_before_any_decode(predict_only, monkeypatch):
    decodes = []

    def load(self, *args, **kwargs):  # every Pillow decode goes through ImageFile.load / Image.load
        decodes.append(self.size)
        raise AssertionError("decoded")

    client, huge = _app(predict_only).test_client(), _png_claiming(12000, 12000)
    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    monkeypatch.setattr(Image.Image, "load", load)
    with pytest.warns(Image.DecompressionBombWarning):  # Pillow's own limit only warns at 144 Mpx
        response = _upload(client, huge, "huge.png")
    assert response.status_code == 400
    assert _error(response.text) == ("huge.png: 12000x12000 pixels is more than this server accepts "
                                     "(50,000,000 pixels, --max-pixels); send a smaller image")
    assert decodes == []
    monkeypatch.undo()
    assert _upload(client, png_bytes(40, 30)).status_code == 200  # and the server still predicts


def test_a_png_over_pillows_own_bomb_limit_is_a_message(predict_only):
    client = _app(predict_only, max_pixels=10**9).test_client()
    response = _upload(client, _png_claiming(20000, 20000), "bomb.png")
    assert response.status_code == 400
    assert _error(response.text).startswith("bomb.png: image too large to decode safely")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_a_busy_server_answers_503_with_retry_after(predict_only):
    app = _app(predict_only, max_predictions=2)
    served_ = app.extensions["pipeline_serve"]
    client = app.test_client()
    for _ in range(2):  # two predictions in flight
        assert served_.predicting.acquire(blocking=False)
    try:
        response = _upload(client, png_bytes(40, 30))
        assert response.status_code == 503 and response.headers["Retry-After"] == "2"
        assert _error(response.text) == "the server is busy with other predictions; try again in 2 s"
    finally:
        served_.predicting.release()
    assert _upload(client, png_bytes(40, 30)).status_code == 200  # one slot free: served
    served_.predicting.release()
    # every request gives its slot back, also the refused ones
    for data in (b"not an image", _png_claiming(12000, 12000), png_bytes(40, 30)):
        _upload(client, data)
    assert [served_.predicting.acquire(blocking=False) for _ in range(3)] == [True, True, False]


def test_serve_command_takes_max_predictions(predict_only):
    result = _cli("serve", "--checkpoint", predict_only, "--max-predictions", "0")
    assert result.exit_code == 2 and "--max-predictions" in result.output


# ------------------------------------------------------------------------------------- query values

@pytest.mark.parametrize("query,message", [
    ("seed=-1", "sample must be from 0 to 9,223,372,036,854,775,807, not -1"),
    ("seed=9223372036854775808", "sample must be from 0 to 9,223,372,036,854,775,807, not 9223372036854775808"),
    ("seed=1.5", "sample must be an integer, not '1.5'"),
    ("n=0", "images must be from 1 to 48, not 0"),
    ("n=49", "images must be from 1 to 48, not 49"),
    ("n=-3&seed=2", "images must be from 1 to 48, not -3"),
    ("n=many", "images must be an integer, not 'many'"),
])
def test_out_of_range_cache_queries_are_400_with_a_message(inputs, query, message):  # noqa: F811
    client = create_app(served(inputs, runs=[])).test_client()
    response = client.get(f"/cache?{query}")
    assert response.status_code == 400 and _error(response.text) == message
    assert client.get("/cache?seed=5&n=3").status_code == 200
