"""torch.hub entry points: release names/URLs, CPU loading from the hub cache, a path or a URL; checkpoints.

No network: weights are random-init timm models saved the way the original
release files are (DataParallel ``module.`` prefix).
"""
from pathlib import Path

import pytest
import timm
import torch

from stage2_student_distill import hub
from stage2_student_distill.hub import HUB_MODELS, HubError, meal_v2, meal_v2_checkpoint

REPO = str(Path(__file__).resolve().parent.parent)
SMALL = "mealv2_mobilenetv3_small_075"  # the smallest released architecture
SMALL_FILE = "MEALV2_MobileNet_V3_Small_0.75_224.pth"

# szq0214/MEAL-V2 hubconf.py, verbatim
ORIGINAL_URLS = {
    "mealv1_resnest50": "https://github.com/szq0214/MEAL-V2/releases/download/v1.0.0/MEALV1_ResNet50_224.pth",
    "mealv2_resnest50": "https://github.com/szq0214/MEAL-V2/releases/download/v1.0.0/MEALV2_ResNet50_224.pth",
    "mealv2_resnest50_cutmix": "https://github.com/szq0214/MEAL-V2/releases/download/v1.0.0/MEALV2_ResNet50_224_cutmix.pth",
    "mealv2_resnest50_380x380": "https://github.com/szq0214/MEAL-V2/releases/download/v1.0.0/MEALV2_ResNet50_380.pth",
    "mealv2_mobilenetv3_small_075": "https://github.com/szq0214/MEAL-V2/releases/download/v1.0.0/MEALV2_MobileNet_V3_Small_0.75_224.pth",
    "mealv2_mobilenetv3_small_100": "https://github.com/szq0214/MEAL-V2/releases/download/v1.0.0/MEALV2_MobileNet_V3_Small_1.0_224.pth",
    "mealv2_mobilenet_v3_large_100": "https://github.com/szq0214/MEAL-V2/releases/download/v1.0.0/MEALV2_MobileNet_V3_Large_1.0_224.pth",
    "mealv2_efficientnet_b0": "https://github.com/szq0214/MEAL-V2/releases/download/v1.0.0/MEALV2_EfficientNet_B0_224.pth",
}
ORIGINAL_ARCHS = {
    "mealv1_resnest50": "resnet50",
    "mealv2_resnest50": "resnet50",
    "mealv2_resnest50_cutmix": "resnet50",
    "mealv2_resnest50_380x380": "resnet50",
    "mealv2_mobilenetv3_small_075": "tf_mobilenetv3_small_075",
    "mealv2_mobilenetv3_small_100": "tf_mobilenetv3_small_100",
    "mealv2_mobilenet_v3_large_100": "tf_mobilenetv3_large_100",
    "mealv2_efficientnet_b0": "tf_efficientnet_b0",
}


def _release_like_file(path: Path, arch: str = "tf_mobilenetv3_small_075", seed: int = 0) -> dict:
    """A random-init model saved as the release's DataParallel state dict; returns the plain state."""
    torch.manual_seed(seed)
    state = timm.create_model(arch, pretrained=False).state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({f"module.{k}": v for k, v in state.items()}, path)
    return state


def _assert_weights(model: torch.nn.Module, state: dict) -> None:
    got = model.state_dict()
    assert got.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(got[k], v), k


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


def test_names_architectures_and_files_mirror_the_original_release():
    assert {n: s.url for n, s in HUB_MODELS.items()} == ORIGINAL_URLS
    assert {n: s.arch for n, s in HUB_MODELS.items()} == ORIGINAL_ARCHS
    assert HUB_MODELS["mealv2_resnest50_380x380"].preprocess.input_size == 380
    assert {s.preprocess.input_size for n, s in HUB_MODELS.items() if n != "mealv2_resnest50_380x380"} == {224}


def test_hubconf_exposes_only_the_two_entry_points():
    # what torch.hub.list shows: public callables of hubconf.py (list() itself only takes GitHub repos)
    import importlib.util

    spec = importlib.util.spec_from_file_location("hubconf_under_test", Path(REPO) / "hubconf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    entries = [f for f in dir(module) if callable(getattr(module, f)) and not f.startswith("_")]
    assert sorted(entries) == ["meal_v2", "meal_v2_checkpoint"]
    assert module.dependencies == ["torch", "timm", "safetensors"]


def test_torch_hub_load_reads_the_hub_cache_on_cpu(torch_home):
    state = _release_like_file(torch_home / "hub" / "checkpoints" / SMALL_FILE)
    model = torch.hub.load(REPO, "meal_v2", SMALL, source="local")  # pretrained=True: release URL -> cache
    _assert_weights(model, state)
    assert not model.training
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert not isinstance(model, torch.nn.DataParallel)
    # MEAL V2's evaluation preprocessing, not timm's defaults for the architecture (mean/std 0.5)
    cfg = timm.data.resolve_data_config({}, model=model)
    assert cfg["input_size"] == (3, 224, 224) and cfg["interpolation"] == "bilinear"
    assert cfg["mean"] == pytest.approx((0.485, 0.456, 0.406)) and cfg["std"] == pytest.approx((0.229, 0.224, 0.225))
    assert cfg["crop_pct"] == pytest.approx(0.875)
    assert model(torch.zeros(1, 3, 224, 224)).shape == (1, 1000)


def test_names_are_case_insensitive_like_the_original(torch_home):
    state = _release_like_file(torch_home / "hub" / "checkpoints" / SMALL_FILE)
    _assert_weights(meal_v2(SMALL.upper()), state)


def test_local_path_and_other_urls(tmp_path, torch_home):
    local = tmp_path / "weights" / "mine.pth"
    state = _release_like_file(local, seed=1)
    _assert_weights(meal_v2(SMALL, pretrained=str(local)), state)
    _assert_weights(meal_v2(SMALL, pretrained=local), state)
    # a file:// URL goes through load_state_dict_from_url, into the hub cache
    _assert_weights(meal_v2(SMALL, pretrained=local.as_uri(), progress=False), state)
    assert (torch_home / "hub" / "checkpoints" / "mine.pth").is_file()
    # an https URL whose file is already cached is not fetched
    mirror = "https://mirror.invalid/meal/mirror.pth"
    cached = _release_like_file(torch_home / "hub" / "checkpoints" / "mirror.pth", seed=2)
    _assert_weights(meal_v2(SMALL, pretrained=mirror), cached)


def test_safetensors_path_without_prefix(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(3)
    state = timm.create_model("tf_mobilenetv3_small_075").state_dict()
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    _assert_weights(meal_v2(SMALL, pretrained=path), state)


def test_offline_without_cache_says_where_to_put_the_file(torch_home, monkeypatch):
    import urllib.error

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(HubError) as e:
        meal_v2(SMALL)
    msg = str(e.value)
    assert ORIGINAL_URLS[SMALL] in msg and str(torch_home / "hub" / "checkpoints" / SMALL_FILE) in msg


def test_unknown_name_lists_the_eight_names():
    with pytest.raises(HubError) as e:
        meal_v2("mealv2_resnet18", pretrained=False)
    assert all(name in str(e.value) for name in HUB_MODELS)


def test_weights_of_another_architecture_are_refused(tmp_path):
    other = tmp_path / "other.pth"
    _release_like_file(other, arch="tf_mobilenetv3_small_100")
    with pytest.raises(HubError, match="do not fit tf_mobilenetv3_small_075"):
        meal_v2(SMALL, pretrained=other)


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": object()}, path)
    with pytest.raises(HubError, match="cannot be loaded safely"):
        meal_v2(SMALL, pretrained=path)


@pytest.mark.parametrize("name", ["mealv2_resnest50_380x380", "mealv2_mobilenetv3_small_100",
                                  "mealv2_mobilenet_v3_large_100", "mealv2_efficientnet_b0"])
def test_every_architecture_builds_on_cpu(name):
    model = meal_v2(name, pretrained=False)
    assert type(model).__name__ == type(timm.create_model(ORIGINAL_ARCHS[name])).__name__
    assert timm.data.resolve_data_config({}, model=model)["input_size"][-1] == HUB_MODELS[name].input_size
    assert model.num_classes == 1000


def _project_checkpoint(path: Path, class_names=("ant", "bee", "cat")) -> torch.nn.Module:
    torch.manual_seed(4)
    model = timm.create_model("test_resnet", num_classes=len(class_names)).eval()
    meta = {
        "kind": "distill",
        "model": "test_resnet",
        "num_classes": len(class_names),
        "class_names": list(class_names),
        "preprocess": {"input_size": 48, "interpolation": "bicubic", "mean": [0.5, 0.4, 0.3],
                       "std": [0.2, 0.2, 0.2], "crop_pct": 0.9},
    }
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}, "meta": meta}, path)
    return model


def test_checkpoint_entry_point(tmp_path):
    path = tmp_path / "best.pt"
    reference = _project_checkpoint(path)
    model = torch.hub.load(REPO, "meal_v2_checkpoint", str(path), source="local")
    assert not model.training
    x = torch.randn(2, 3, 48, 48)
    torch.testing.assert_close(model(x), reference(x))
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, 48, 48) and cfg["interpolation"] == "bicubic" and cfg["crop_pct"] == 0.9
    assert cfg["label_names"] == ["ant", "bee", "cat"]


def test_checkpoint_without_metadata_needs_model_name(tmp_path):
    path = tmp_path / "plain.pt"
    torch.manual_seed(5)
    reference = timm.create_model("test_resnet", num_classes=4).eval()
    torch.save(reference.state_dict(), path)
    with pytest.raises(ValueError, match="no model metadata"):
        meal_v2_checkpoint(path)
    model = meal_v2_checkpoint(path, model_name="test_resnet", num_classes=4)
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(model(x), reference(x))


def test_hubconf_is_thin():
    text = (Path(REPO) / "hubconf.py").read_text()
    assert "from stage2_student_distill.hub import meal_v2, meal_v2_checkpoint" in text
    assert hub.meal_v2.__doc__ and "mealv2_efficientnet_b0" in hub.meal_v2.__doc__
