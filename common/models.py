"""Model registry: timm names, MEAL V2 aliases, safe weight loading, preprocessing.

Preprocessing is derived from the model (timm's pretrained config), never
hard-coded: each teacher sees crops at its own input size, interpolation and
mean/std, and the student at its own.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from common.config import INTERPOLATIONS
from common.errors import PipelineError, cause_text

IMAGENET_CLASSES = 1000  # the class count of timm's pretrained weights and of the released MEAL V2 models


@dataclass(frozen=True)
class ModelName:
    """What a short model name stands for."""

    timm_name: str  # a timm architecture; with a weights tag for the teachers' timm weights
    release_file: str = ""  # set for a released MEAL V2 model: its file in the release (`predict --hub`)
    input_size: int = 224  # a released model's evaluation resolution


# Every short model name, written once. The teachers of the MEAL V2 paper resolve to timm names with
# weights tags (ALIASES); the released MEAL V2 models are loaded by name from their release
# (stage2_student_distill/hub.py HUB_MODELS, hubconf.py). The released names, architectures and files are
# the original's (szq0214/MEAL-V2 hubconf.py): "resnest50" there is a vanilla ResNet-50.
MODEL_NAMES: dict[str, ModelName] = {
    "senet154": ModelName("senet154.gluon_in1k"),
    "resnest269": ModelName("resnest269e.in1k"),
    "resnest269e": ModelName("resnest269e.in1k"),
    "resnet152s": ModelName("resnet152s.gluon_in1k"),
    # the 380 px recipe of MEAL V2 uses EfficientNet-B4 teachers
    "efficientnet_b4": ModelName("tf_efficientnet_b4.ns_jft_in1k"),
    "efficientnet_b4_ap": ModelName("tf_efficientnet_b4.ap_in1k"),
    "efficientnet_b4_aa": ModelName("tf_efficientnet_b4.aa_in1k"),
    "mealv1_resnest50": ModelName("resnet50", "MEALV1_ResNet50_224.pth"),
    "mealv2_resnest50": ModelName("resnet50", "MEALV2_ResNet50_224.pth"),
    "mealv2_resnest50_cutmix": ModelName("resnet50", "MEALV2_ResNet50_224_cutmix.pth"),
    "mealv2_resnest50_380x380": ModelName("resnet50", "MEALV2_ResNet50_380.pth", input_size=380),
    "mealv2_mobilenetv3_small_075": ModelName("tf_mobilenetv3_small_075", "MEALV2_MobileNet_V3_Small_0.75_224.pth"),
    "mealv2_mobilenetv3_small_100": ModelName("tf_mobilenetv3_small_100", "MEALV2_MobileNet_V3_Small_1.0_224.pth"),
    "mealv2_mobilenet_v3_large_100": ModelName("tf_mobilenetv3_large_100", "MEALV2_MobileNet_V3_Large_1.0_224.pth"),
    "mealv2_efficientnet_b0": ModelName("tf_efficientnet_b0", "MEALV2_EfficientNet_B0_224.pth"),
}
# Short name -> timm name with weights tag, for --teachers / --student / --model.
ALIASES: dict[str, str] = {name: m.timm_name for name, m in MODEL_NAMES.items() if not m.release_file}


class WeightsError(PipelineError):
    """A weights file is missing, unsafe or does not fit the model."""


@dataclass(frozen=True)
class Preprocess:
    """How a model wants its pixels: the contract between a crop and a forward pass."""

    input_size: int
    interpolation: str  # bilinear | bicubic | nearest
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float  # evaluation centre crop: side = crop_pct * shorter side

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocess":
        return cls(
            input_size=int(d["input_size"]),
            interpolation=str(d["interpolation"]),
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
            crop_pct=float(d["crop_pct"]),
        )


def apply_preprocess_config(pre: Preprocess, cfg: Any) -> Preprocess:
    """``pre`` with the set fields of a ``[preprocess]`` table (common.config.PreprocessConfig) replacing its own.

    How a recipe states the evaluation its published number was measured
    with (MEAL V2: bilinear, resize 256/224 then centre crop = crop_pct 0.875,
    ImageNet mean/std) where timm's pretrained config says otherwise. The
    result is recorded in the checkpoint's ``meta["preprocess"]``, which
    evaluate, predict, export and the hub entry points read back.
    """
    given = {"interpolation": cfg.interpolation, "crop_pct": float(cfg.crop_pct),
             "mean": tuple(float(v) for v in cfg.mean), "std": tuple(float(v) for v in cfg.std)}
    return replace(pre, **{key: value for key, value in given.items() if value})  # "", 0 and () are unset


def resolve_name(name: str) -> str:
    """Short alias -> timm name with weights tag; timm names pass through."""
    return ALIASES.get(name, name)


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a state dict without executing code; returns (state_dict, metadata).

    Accepts safetensors, a plain state dict, or this project's checkpoints
    (``{"model": state_dict, "meta": {...}}``). ``module.`` (DataParallel/DDP)
    and ``_orig_mod.`` (torch.compile) prefixes are stripped.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist; check the path given to --*-weights")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                state = {k: f.get_tensor(k) for k in f.keys()}
                raw_meta = f.metadata() or {}
            meta = json.loads(raw_meta["meta"]) if "meta" in raw_meta else {}
        except Exception as e:  # SafetensorError (truncated, bad header), a bad meta JSON
            raise WeightsError(f"{path}: cannot be read as a safetensors file ({cause_text(e)}); "
                               "is it truncated or damaged?") from e
    else:
        state, meta = state_and_meta(load_torch_file(path), path)
    state = {_strip_prefixes(k): v for k, v in state.items()}
    check_metadata(meta, path, state)
    return state, meta


def state_and_meta(obj: Any, source: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, metadata) of what ``torch.load`` returned: this project's checkpoint
    (``{"model": state_dict, "meta": {...}}``), a ``{"state_dict": ...}`` wrapper or a plain state dict."""
    meta: dict[str, Any] = {}
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        meta, obj = obj.get("meta") or {}, obj["model"]
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{source}: not a state dict of tensors")
    return obj, meta


# What a checkpoint's metadata may ask a reader to build. Outside these, the file is damaged or hostile:
# the largest input of any timm pretrained config is 1024 px, ImageNet-21k has 21,843 classes.
MAX_INPUT_SIZE = 4096
MAX_CLASSES = 10**6
MAX_CROP_PCT = 2.0  # timm's own configs reach 1.15 (volo_d5_512)
# A timm architecture with an optional weights tag; no scheme ("hf-hub:", "local-dir:") nor path ("timm/..."),
# which would make timm read a model hub or a local directory just to build the architecture.
_LOCAL_MODEL_NAME = re.compile(r"([A-Za-z0-9_]+)(?:\.[A-Za-z0-9_]+)?")


def check_metadata(meta: Any, path: str | Path, state: dict[str, torch.Tensor] | None = None) -> None:
    """Refuse checkpoint metadata that would fetch, allocate or compute what the file does not justify.

    The one check of what a checkpoint says about itself (model name, classes,
    class names, preprocessing), run by :func:`read_weights` for every reader:
    evaluate, predict, export, serve, the hub entry points and ``--*-weights``.
    Keys that are absent stay the caller's business (a plain state dict has none).
    ``state``, when given, must hold a classifier with ``num_classes`` outputs,
    so a class count is only believed when the file pays for it.
    """
    def refuse(key: str, why: str) -> None:
        raise WeightsError(f"{path}: metadata key {key!r} {why}; the file is damaged or was edited, "
                           "use a checkpoint written by `pipeline distill/train/export`")

    if not isinstance(meta, dict):
        refuse("meta", f"is a {type(meta).__name__}, not a table of keys")
    if "model" in meta:
        name = meta["model"]
        found = _LOCAL_MODEL_NAME.fullmatch(resolve_name(name)) if isinstance(name, str) else None
        if found is None:
            refuse("model", f"is {name!r}, not a timm architecture name (a hub or path prefix is not accepted)")
        if not _timm_knows(found.group(0)):
            refuse("model", f"is {name!r}, which is not an architecture (with weights tag) of the installed timm")
    classes = meta.get("num_classes")
    if "num_classes" in meta:
        _check_int(classes, 1, MAX_CLASSES, lambda why: refuse("num_classes", why))
    if "class_names" in meta:
        names = meta["class_names"]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            refuse("class_names", "must be a list of strings")
        if classes is not None and len(names) != classes:
            refuse("class_names", f"lists {len(names)} names for num_classes = {classes}")
    if "preprocess" in meta:
        _check_preprocess(meta["preprocess"], lambda key, why: refuse(".".join(filter(None, ("preprocess", key))), why))
    if state is not None and isinstance(meta.get("model"), str) and classes is not None:
        key = _classifier_key(meta["model"])
        weight = state.get(f"{key}.weight") if key else None
        if weight is not None and weight.ndim >= 1 and weight.shape[0] != classes:
            refuse("num_classes", f"is {classes} but the classifier {key} has {weight.shape[0]} outputs")


def _check_int(value: Any, lo: int, hi: int, refuse) -> None:
    if type(value) is not int:  # not bool, float or str: a writer of this project writes ints
        refuse(f"is {value!r} ({type(value).__name__}); it must be an integer from {lo:,} to {hi:,}")
    if not lo <= value <= hi:
        refuse(f"is {value:,}; it must be from {lo:,} to {hi:,}")


def _check_preprocess(pre: Any, refuse) -> None:
    if not isinstance(pre, dict):
        refuse("", f"is a {type(pre).__name__}, not a table")
    for key in ("input_size", "interpolation", "mean", "std", "crop_pct"):
        if key not in pre:
            refuse(key, "is missing")
    _check_int(pre["input_size"], 1, MAX_INPUT_SIZE, lambda why: refuse("input_size", why))
    if pre["interpolation"] not in INTERPOLATIONS:
        refuse("interpolation", f"is {pre['interpolation']!r}; use one of {', '.join(INTERPOLATIONS)}")
    for key in ("mean", "std"):
        values = pre[key]
        if (not isinstance(values, (list, tuple)) or len(values) != 3
                or not all(_is_finite_number(v) for v in values)):
            refuse(key, f"is {values!r}; it must be 3 finite numbers (R, G, B)")
    if not all(v > 0 for v in pre["std"]):
        refuse("std", f"is {pre['std']!r}; every value must be > 0 (it divides the pixels)")
    crop = pre["crop_pct"]
    if not _is_finite_number(crop) or not 0 < crop <= MAX_CROP_PCT:
        refuse("crop_pct", f"is {crop!r}; it must be a number in (0, {MAX_CROP_PCT:g}]")


def _is_finite_number(v: Any) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


def _timm_knows(name: str) -> bool:
    """An architecture in timm's registry, and its weights tag if one is given (timm refuses unknown tags)."""
    if not timm.is_model(name):
        return False
    try:
        timm.models.get_pretrained_cfg(name)
    except RuntimeError:  # "Invalid pretrained tag"
        return False
    return True


def _classifier_key(name: str) -> str | None:
    """The classifier module of a (checked) timm name, from timm's registry: nothing is built or fetched."""
    key = timm.models.get_pretrained_cfg_value(resolve_name(name), "classifier")
    return key if isinstance(key, str) else None


def load_failure(path: str | Path, e: Exception) -> str:
    """Why ``torch.load(path, weights_only=True)`` failed: code it refused to run, or a file it could not read."""
    text = str(e)
    # torch raises pickle's UnpicklingError here; matched by name so this module imports no pickle at all
    if type(e).__name__ == "UnpicklingError" and "Weights only load failed" in text:
        accepted = "Only safetensors files and plain tensor state dicts are accepted."
        if refused := _REFUSED_GLOBAL.search(text):
            return (f"{path}: cannot be loaded safely: it holds the Python object {refused.group(1)}, "
                    f"not only tensors, and loading it could run code. {accepted}")
        # Other refusals (a reduce call, an opcode) name their cause in the unpickler's first sentence.
        reason = _UNPICKLER_REASON.search(text)
        detail = f" (the unpickler refused: {reason.group(1)})" if reason else ""
        return f"{path}: cannot be loaded safely: it holds Python objects, not only tensors{detail}. {accepted}"
    return f"{path}: cannot be read as a torch file ({cause_text(e)}); is it truncated, damaged or another format?"


# torch's weights-only unpickler: "WeightsUnpickler error: Unsupported global: GLOBAL a.b.C was not an allowed ..."
_REFUSED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
_UNPICKLER_REASON = re.compile(r"WeightsUnpickler error: ([^\n]{1,200}?)(?:\.\s|\.?$)", re.M)


def load_torch_file(path: str | Path) -> Any:
    """``torch.load`` without executing code; a WeightsError naming the path and the cause otherwise."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(load_failure(path, e)) from e


def _strip_prefixes(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key


def create_model(
    name: str,
    num_classes: int,
    pretrained: bool = False,
    weights: str | Path | None = None,
    input_size: int | None = None,
) -> tuple[nn.Module, Preprocess]:
    """Build a timm model and its preprocessing.

    ``weights`` (a local file) wins over ``pretrained`` (timm hub weights). A
    checkpoint written by this project carries its own preprocessing, which is
    used unless ``input_size`` overrides the size.
    """
    timm_name = resolve_name(name)
    meta: dict[str, Any] = {}
    state = None
    if weights:
        state, meta = read_weights(weights)
        pretrained = False
    try:
        model = timm.create_model(timm_name, pretrained=pretrained, num_classes=num_classes)
    except Exception as e:
        if isinstance(e, RuntimeError) and "Unknown model" in str(e):
            raise WeightsError(f"unknown model {name!r}: not a timm model name nor one of {sorted(ALIASES)}") from e
        if not pretrained:
            raise
        raise WeightsError(_pretrained_failure(name, timm_name, e)) from e
    if state is not None:
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
            mismatch = (f"missing {len(missing)} keys e.g. {missing[:3]}, unexpected {len(unexpected)} e.g. "
                        f"{unexpected[:3]}" if missing or unexpected else "")
        except RuntimeError as e:  # shape mismatch, e.g. a classifier for another class count
            lines = str(e).splitlines()
            mismatch = lines[1].strip() if len(lines) > 1 else str(e)
        if mismatch:
            raise WeightsError(f"{weights}: does not fit {timm_name} with {num_classes} classes ({mismatch}). "
                               "Check the model name and the number of classes.")
    if "preprocess" in meta:
        pre = Preprocess.from_dict(meta["preprocess"])
    else:
        timm_cfg = timm.data.resolve_data_config({}, model=model)
        pre = Preprocess.from_dict({"interpolation": "bilinear", "crop_pct": 0.875, **timm_cfg,
                                    "input_size": timm_cfg["input_size"][-1]})
    if input_size:
        pre = replace(pre, input_size=int(input_size))
    return model, pre


def _pretrained_failure(name: str, timm_name: str, e: Exception) -> str:
    """A download failure (OSError) is told from weights timm fetched but could not use; both name the cause."""
    local = f"pass a local file: --teacher-weights {name}=PATH (or --student-weights PATH)"
    if isinstance(e, OSError):
        return f"could not fetch pretrained weights for {timm_name!r} ({cause_text(e, 300)}). Without internet, {local}"
    return (f"timm could not load the pretrained weights of {timm_name!r} ({cause_text(e, 300)}); if its copy in the "
            f"hub cache (~/.cache/huggingface) is damaged, delete it to download it again, or {local}")
