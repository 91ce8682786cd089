"""torch.hub entry points: the released MEAL V2 models and this project's students.

``hubconf.py`` at the repository root only re-exports :func:`meal_v2` and
:func:`meal_v2_checkpoint`, so::

    model = torch.hub.load("OWNER/REPO", "meal_v2", "mealv2_resnest50")           # release weights
    model = torch.hub.load(REPO_DIR, "meal_v2", "mealv2_resnest50", source="local")
    model = torch.hub.load(REPO_DIR, "meal_v2_checkpoint", "runs/x/best.pt", source="local")

Differences from the original MEAL-V2 ``hubconf.py`` (same names, same timm
architectures, same release files):

* no ``.cuda()`` / ``DataParallel``: the model is returned on ``device``
  (default CPU) and in eval mode; the ``module.`` prefix of the released
  DataParallel checkpoints is stripped instead;
* ``pretrained`` may also be a local file or another URL (offline machines);
  ``True`` reads the torch hub cache (``$TORCH_HOME/hub/checkpoints/<file>``)
  before trying the network, with ``weights_only=True`` (no pickle execution);
* the model's ``pretrained_cfg`` describes the preprocessing MEAL V2 was
  evaluated with (resize 256/224 x, centre crop, bilinear, ImageNet mean/std;
  380 px for ``mealv2_resnest50_380x380``), so
  ``timm.data.resolve_data_config({}, model=model)`` gives the right transform.
  timm's own defaults for these architectures differ (e.g. resnet50: bicubic,
  crop 0.95; tf_mobilenetv3: mean/std 0.5) and would cost accuracy.
"""
from __future__ import annotations

import os
import urllib.error
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlparse

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from common.errors import PipelineError
from common.locations import scheme
from common.models import (IMAGENET_CLASSES, MODEL_NAMES, Preprocess, WeightsError, create_model, load_failure, read_weights,
                           state_and_meta)

RELEASE = "https://github.com/szq0214/MEAL-V2/releases/download/v1.0.0/"


@dataclass(frozen=True)
class HubModel:
    """One released MEAL V2 model: timm architecture, weights file, eval resolution."""

    arch: str
    file_name: str
    input_size: int = 224

    @property
    def url(self) -> str:
        return RELEASE + self.file_name

    @property
    def preprocess(self) -> Preprocess:
        # MEAL-V2 inference.py / imagenet.py: Resize(int(256 / 224 * res)), CenterCrop(res),
        # torchvision's default bilinear resize, ImageNet mean/std -- for every architecture.
        return Preprocess(self.input_size, "bilinear", IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, crop_pct=224 / 256)


# The released models of the one table of model names (common/models.py MODEL_NAMES).
HUB_MODELS: dict[str, HubModel] = {name: HubModel(m.timm_name, m.release_file, m.input_size)
                                   for name, m in MODEL_NAMES.items() if m.release_file}


class HubError(PipelineError):
    """Unknown hub name, or weights that cannot be fetched or do not fit."""


class LoadedModel(NamedTuple):
    """A model ready for inference with everything needed to feed it and read its output."""

    model: nn.Module
    preprocess: Preprocess
    class_names: tuple[str, ...] | None  # None: unknown (ImageNet-1k for the released models)
    meta: dict[str, Any]  # JSON-able description, written into exports


def hub_model(name: str) -> HubModel:
    spec = HUB_MODELS.get(str(name).lower())
    if spec is None:
        raise HubError(f"unknown MEAL V2 model {name!r}; choose one of: {', '.join(HUB_MODELS)}")
    return spec


# What torch.hub.load_state_dict_from_url downloads; any other source is a local file.
_DOWNLOAD_SCHEMES = ("http", "https", "file", "ftp")


def fetch_state_dict(name: str, pretrained: bool | str | os.PathLike = True, progress: bool = True) -> dict[str, torch.Tensor]:
    """The weights of hub model ``name``: from its release URL (True), another URL or a local file.

    URLs go through ``torch.hub.load_state_dict_from_url``, which reuses
    ``<torch.hub.get_dir()>/checkpoints/<file name>`` when present.
    """
    spec = hub_model(name)
    source = spec.url if pretrained is True else os.fspath(pretrained)
    if scheme(source) not in _DOWNLOAD_SCHEMES:
        try:
            state, _ = read_weights(source)
        except WeightsError as e:
            raise HubError(f"{name}: {e}") from e
        return state
    file_name = Path(urlparse(source).path).name
    cached = Path(torch.hub.get_dir()) / "checkpoints" / file_name
    try:
        obj = torch.hub.load_state_dict_from_url(source, map_location="cpu", progress=progress, weights_only=True)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise HubError(
            f"could not download {source} ({type(e).__name__}: {e}). Without internet, copy {file_name} "
            f"to {cached} (the torch hub cache) or pass pretrained='/path/to/{file_name}'"
        ) from e
    except Exception as e:  # weights_only refusal (an UnpicklingError), truncation, corruption
        raise HubError(f"{load_failure(cached, e)} Delete it to download it again.") from e
    try:
        state, _ = state_and_meta(obj, cached)
    except WeightsError as e:
        raise HubError(str(e)) from e
    return {k.removeprefix("module."): v for k, v in state.items()}


def _describe(model: nn.Module, pre: Preprocess, class_names: tuple[str, ...] | None, **extra: Any) -> None:
    """Record the preprocessing (and labels) in timm's ``pretrained_cfg``, where timm's data helpers look."""
    dropped = ("test_input_size", "test_crop_pct", "url", "hf_hub_id", "hf_hub_filename", "file", "state_dict")
    cfg = {k: v for k, v in (getattr(model, "pretrained_cfg", None) or {}).items() if k not in dropped}
    cfg.update(
        input_size=(3, pre.input_size, pre.input_size),
        interpolation=pre.interpolation,
        mean=tuple(pre.mean),
        std=tuple(pre.std),
        crop_pct=pre.crop_pct,
        crop_mode="center",
        label_names=list(class_names) if class_names else None,
        **extra,
    )
    model.pretrained_cfg = cfg


def load_hub_model(
    model_name: str,
    pretrained: bool | str | os.PathLike = True,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """A released MEAL V2 model with its preprocessing; see :func:`meal_v2`."""
    name = str(model_name).lower()
    spec = hub_model(name)
    model = timm.create_model(spec.arch, pretrained=False, num_classes=IMAGENET_CLASSES)
    if pretrained is not False and pretrained is not None:
        state = fetch_state_dict(name, pretrained, progress)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            first = str(e).splitlines()
            raise HubError(
                f"weights for {name} do not fit {spec.arch} ({' '.join(l.strip() for l in first[:2])[:300]})"
            ) from e
    model.to(device).eval()
    pre = spec.preprocess
    _describe(model, pre, None, num_classes=IMAGENET_CLASSES, url=spec.url, architecture=spec.arch)
    meta = {
        "model": spec.arch,
        "num_classes": IMAGENET_CLASSES,
        "preprocess": pre.to_dict(),
        "source": f"meal_v2:{name}",
        "dataset": "imagenet-1k",
    }
    return LoadedModel(model, pre, None, meta)


def load_checkpoint_model(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    model_name: str | None = None,
    num_classes: int | None = None,
) -> LoadedModel:
    """A student written by ``pipeline distill``/``train`` (or ``pipeline export``); see :func:`meal_v2_checkpoint`."""
    path = Path(path)
    _, meta = read_weights(path)
    name = model_name or meta.get("model")
    classes = num_classes if num_classes is not None else meta.get("num_classes")
    if not name or classes is None:
        raise WeightsError(
            f"{path}: has no model metadata (model name, number of classes); use a checkpoint written by "
            "`pipeline distill`/`pipeline train` (RUN/best.pt) or `pipeline export`, or pass model_name= and "
            "num_classes=; for the released MEAL V2 models use meal_v2(NAME)"
        )
    model, pre = create_model(str(name), int(classes), weights=path)
    model.to(device).eval()
    names = meta.get("class_names")
    names = tuple(str(n) for n in names) if names else None
    if names is not None and len(names) != int(classes):
        raise WeightsError(f"{path}: metadata lists {len(names)} class names for {classes} classes")
    _describe(model, pre, names, num_classes=int(classes))
    out_meta = {k: v for k, v in meta.items() if k not in ("model", "num_classes", "preprocess", "class_names")}
    out_meta.update(model=str(name), num_classes=int(classes), preprocess=pre.to_dict(), source=str(path))
    if names is not None:
        out_meta["class_names"] = list(names)
    return LoadedModel(model, pre, names, out_meta)


def meal_v2(
    model_name: str,
    pretrained: bool | str | os.PathLike = True,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """MEAL V2 models from "MEAL V2: Boosting Vanilla ResNet-50 to 80%+ Top-1 Accuracy on ImageNet
    without Tricks" (https://arxiv.org/abs/2009.08453), as timm models in eval mode.

    Args:
        model_name: mealv1_resnest50, mealv2_resnest50, mealv2_resnest50_cutmix,
            mealv2_resnest50_380x380, mealv2_mobilenetv3_small_075,
            mealv2_mobilenetv3_small_100, mealv2_mobilenet_v3_large_100 or
            mealv2_efficientnet_b0 (the ``resnest50`` ones are vanilla ResNet-50s).
        pretrained: True: the release weights (torch hub cache, else downloaded);
            a URL or a local file (.pth state dict or .safetensors): those weights;
            False: random initialisation.
        progress: show a download progress bar.
        device: where the model is put (default CPU; nothing is moved to CUDA unasked).

    Input: ImageNet-normalised RGB, 224 px (380 px for ``mealv2_resnest50_380x380``),
    resized to 256/224 of the crop and centre-cropped;
    ``timm.data.resolve_data_config({}, model=model)`` returns exactly this.
    """
    return load_hub_model(model_name, pretrained, progress, device).model


def meal_v2_checkpoint(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    model_name: str | None = None,
    num_classes: int | None = None,
) -> nn.Module:
    """A student distilled by this project, from its checkpoint (RUN/best.pt) or export (.safetensors).

    The architecture, class count, preprocessing and class names come from the
    checkpoint's metadata (``model_name``/``num_classes`` override or stand in
    for it); they are recorded in ``model.pretrained_cfg`` (``input_size``,
    ``mean``, ``std``, ``crop_pct``, ``interpolation``, ``label_names``).
    Loaded without executing pickled code; returned in eval mode on ``device``.
    """
    return load_checkpoint_model(path, device, model_name, num_classes).model
