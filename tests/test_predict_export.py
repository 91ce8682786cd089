"""`pipeline predict` and `pipeline export` on tiny random-init models and generated images (no network)."""
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from click.testing import CliRunner
from PIL import Image

from common.crops import centre_box
from common.models import Preprocess, create_model, read_weights
from stage2_student_distill.export import ExportError, check_onnx
from stage2_student_distill.hub import HUB_MODELS, meal_v2_checkpoint
from stage2_student_distill.predict import preprocess_image
from stage2_student_distill.use_cli import export_command, predict_command

NAMES = ["ant", "bee", "cat"]
PRE = {"input_size": 40, "interpolation": "bilinear", "mean": [0.5, 0.45, 0.4], "std": [0.25, 0.25, 0.25],
       "crop_pct": 0.875}


def _checkpoint(path: Path, class_names=NAMES, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model("test_resnet", num_classes=3).eval()
    meta = {"kind": "distill", "model": "test_resnet", "num_classes": 3, "preprocess": PRE}
    if class_names is not None:
        meta["class_names"] = list(class_names)
    torch.save({"model": model.state_dict(), "meta": meta}, path)
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    rng = np.random.default_rng(0)
    images = []
    for i, (w, h) in enumerate([(64, 48), (50, 90), (33, 33)]):
        p = root / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        images.append(str(p))
    ckpt = root / "best.pt"
    model = _checkpoint(ckpt)
    return {"root": root, "images": images, "ckpt": str(ckpt), "model": model}


def _invoke(command, args, **kwargs):
    return CliRunner().invoke(command, [str(a) for a in args], catch_exceptions=False, **kwargs)


def _predict_json(args, **kwargs):
    result = _invoke(predict_command, [*args, "--json", "--device", "cpu"], **kwargs)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_preprocessing_is_the_centre_crop_at_the_models_size(tmp_path):
    # red frame around a blue square that is exactly the crop_pct centre box
    w, h, pre = 120, 80, Preprocess(32, "bilinear", (0.5,) * 3, (0.5,) * 3, 0.875)
    x, y, side, _ = centre_box(w, h, pre.crop_pct)
    pixels = np.zeros((h, w, 3), np.uint8)
    pixels[..., 0] = 255
    pixels[y : y + side, x : x + side] = (0, 0, 255)
    Image.fromarray(pixels).save(tmp_path / "framed.png")
    crop = preprocess_image(tmp_path / "framed.png", pre)
    assert crop.shape == (3, 32, 32) and crop.dtype == torch.uint8
    assert int(crop[0].max()) == 0 and int(crop[2].min()) == 255


def test_predict_checkpoint_top_classes_with_names(files):
    out = _predict_json([*files["images"], "--checkpoint", files["ckpt"]])
    assert [o["image"] for o in out] == files["images"]
    pre = Preprocess.from_dict(PRE)
    batch = torch.stack([preprocess_image(p, pre) for p in files["images"]]).float()
    mean = torch.tensor(PRE["mean"]).view(1, 3, 1, 1) * 255
    std = torch.tensor(PRE["std"]).view(1, 3, 1, 1) * 255
    with torch.no_grad():
        expected = files["model"]((batch - mean) / std).softmax(-1)
    for o, probs in zip(out, expected):
        assert len(o["top"]) == 3  # top-5 of a 3-class model
        assert [t["name"] for t in o["top"]] == [NAMES[t["index"]] for t in o["top"]]
        got = [t["prob"] for t in o["top"]]
        assert got == sorted(got, reverse=True)
        assert got == pytest.approx([float(probs[t["index"]]) for t in o["top"]], abs=1e-5)


def test_predict_text_output_and_batching(files):
    result = _invoke(predict_command, [*files["images"], "--checkpoint", files["ckpt"], "--topk", "2",
                                       "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[0] == files["images"][0] and len(lines) == 3 * 3
    assert lines[1].lstrip().startswith("1.") and "%" in lines[1]
    assert any(name in lines[1] for name in NAMES)


def test_predict_names_from_manifest(files, tmp_path):
    from common.manifest import ManifestRow, write_manifest

    ckpt = tmp_path / "nameless.pt"
    _checkpoint(ckpt, class_names=None)
    manifest = tmp_path / "m.parquet"
    write_manifest([ManifestRow("a.png", 0, 4, 4, 1, "0" * 64)], ["x", "y", "z"], tmp_path, manifest)
    out = _predict_json([files["images"][0], "--checkpoint", ckpt, "--manifest", manifest])
    assert {t["name"] for t in out[0]["top"]} == {"x", "y", "z"}
    out = _predict_json([files["images"][0], "--checkpoint", ckpt])
    assert {t["name"] for t in out[0]["top"]} == {"class 0", "class 1", "class 2"}
    bad = _invoke(predict_command, [files["images"][0], "--checkpoint", files["ckpt"], "--manifest", manifest])
    assert bad.exit_code == 1 and "leave out --manifest" in bad.output


def test_predict_hub_model_prints_imagenet_names(files, tmp_path, monkeypatch):
    from timm.data import ImageNetInfo

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    cache = tmp_path / "torch_home" / "hub" / "checkpoints" / HUB_MODELS["mealv2_mobilenetv3_small_075"].file_name
    cache.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save({f"module.{k}": v for k, v in timm.create_model("tf_mobilenetv3_small_075").state_dict().items()},
               cache)
    out = _predict_json([files["images"][1], "--hub", "mealv2_mobilenetv3_small_075"])
    info = ImageNetInfo()
    top = out[0]["top"]
    assert len(top) == 5
    assert all(t["name"] == info.index_to_description(t["index"]) for t in top)
    # --hub-weights: a local file instead of the release URL / cache
    again = _predict_json([files["images"][1], "--hub", "mealv2_mobilenetv3_small_075", "--hub-weights", cache])
    assert again == out


@pytest.mark.parametrize(
    "args, message",
    [
        (["{img}", "--hub", "mealv2_resnet18"], "mealv2_efficientnet_b0"),
        (["nope.jpg", "--checkpoint", "{ckpt}"], "nope.jpg: no such file"),
        (["{img}", "--checkpoint", "missing.pt"], "missing.pt"),
        (["{img}", "--checkpoint", "{ckpt}", "--topk", "0"], "--topk must be >= 1"),
    ],
)
def test_predict_user_errors_are_one_line(files, args, message):
    args = [a.format(img=files["images"][0], ckpt=files["ckpt"]) for a in args]
    result = _invoke(predict_command, args)
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_predict_needs_exactly_one_model(files):
    assert _invoke(predict_command, [files["images"][0]]).exit_code == 2
    both = _invoke(predict_command, [files["images"][0], "--checkpoint", files["ckpt"], "--hub", "x"])
    assert both.exit_code == 2 and "exactly one of" in both.output


def test_export_safetensors_round_trip(files, tmp_path):
    out = tmp_path / "deploy" / "student.safetensors"
    result = _invoke(export_command, ["--checkpoint", files["ckpt"], "--out", out])
    assert result.exit_code == 0, result.output
    state, meta = read_weights(out)
    assert meta["model"] == "test_resnet" and meta["num_classes"] == 3 and meta["class_names"] == NAMES
    assert meta["preprocess"] == PRE
    model, pre = create_model(meta["model"], meta["num_classes"], weights=out)
    assert pre == Preprocess.from_dict(PRE)
    x = torch.randn(2, 3, 40, 40)
    torch.testing.assert_close(meal_v2_checkpoint(out)(x), files["model"](x))
    # the export predicts exactly like the checkpoint it came from
    assert _predict_json([*files["images"], "--checkpoint", out]) == _predict_json(
        [*files["images"], "--checkpoint", files["ckpt"]])


def test_export_rejects_a_safetensors_path_without_the_suffix(files, tmp_path):
    result = _invoke(export_command, ["--checkpoint", files["ckpt"], "--format", "safetensors",
                                      "--out", tmp_path / "student.bin"])
    assert result.exit_code == 1 and "must end in .safetensors" in result.output
    assert not (tmp_path / "student.bin").exists()


@pytest.fixture(scope="module")
def onnx_export(files):
    pytest.importorskip("onnxruntime", reason="ONNX export check needs onnxruntime (pip install onnxruntime)")
    pytest.importorskip("onnxscript", reason="the dynamo ONNX exporter needs onnxscript")
    out = files["root"] / "onnx" / "student.onnx"
    result = _invoke(export_command, ["--checkpoint", files["ckpt"], "--format", "onnx", "--out", out])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_export_onnx_dynamic_batch_matches_pytorch(files, onnx_export):
    import onnx
    import onnxruntime as ort

    out, output = onnx_export
    assert "onnxruntime matches PyTorch" in output
    assert sorted(p.name for p in out.parent.iterdir()) == ["student.onnx"]  # no staging left behind
    proto = onnx.load(str(out))
    meta = json.loads({p.key: p.value for p in proto.metadata_props}["meal.meta"])
    assert meta["class_names"] == NAMES and meta["preprocess"] == PRE
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == "batch"
    x = torch.randn(5, 3, 40, 40)
    got = session.run(["logits"], {"input": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, files["model"](x).numpy(), rtol=1e-4, atol=1e-5)


def test_onnx_check_fails_loudly_on_a_different_model(files, onnx_export):
    out, _ = onnx_export
    other = timm.create_model("test_resnet", num_classes=3).eval()  # other random weights
    with pytest.raises(ExportError, match="does not reproduce PyTorch"):
        check_onnx(out, other, 40)


def test_export_onnx_mismatch_writes_nothing(files, onnx_export, tmp_path, monkeypatch):
    """The exporter "produces" a graph of other weights (the fixture's file, reloaded; no second
    slow export): the command must fail and leave nothing at --out."""
    import onnx_ir

    exported, _ = onnx_export

    class Program:  # the part of torch.onnx.ONNXProgram that export_onnx uses
        def __init__(self):
            self.model = onnx_ir.load(str(exported))

        def save(self, dest, external_data=False):
            onnx_ir.save(self.model, dest)

    monkeypatch.setattr(torch.onnx, "export", lambda *args, **kwargs: Program())
    ckpt = tmp_path / "ckpt" / "other.pt"
    ckpt.parent.mkdir()
    _checkpoint(ckpt, seed=1)  # same architecture, other weights than the exported graph
    out = tmp_path / "out" / "bad.onnx"
    result = _invoke(export_command, ["--checkpoint", ckpt, "--out", out])
    assert result.exit_code == 1 and "does not reproduce PyTorch" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert list(out.parent.iterdir()) == []
