"""`pipeline predict`: top-k classes of a few images with a distilled student or a released MEAL V2 model.

Pixels go through the same path as evaluation (``loaders`` in eval mode):
decode with EXIF orientation, centre box of ``crop_pct`` x the shorter side
(``common.crops.centre_box``), antialiased resize to the model's input size,
mean/std normalisation -- all from the model's own :class:`Preprocess`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from common.crops import centre_box
from common.errors import PipelineError
from common.images import ImageError
from common.manifest import load_manifest
from common.models import Preprocess
from common.render import decode, normalize, render_crops
from stage2_student_distill.hub import IMAGENET_CLASSES, LoadedModel, load_checkpoint_model, load_hub_model


class PredictError(PipelineError):
    """Bad arguments to predict (the message says which)."""


@dataclass(frozen=True)
class Prediction:
    image: str
    top: tuple[tuple[int, str, float], ...]  # (class index, class name, probability), most likely first

    def to_dict(self) -> dict:
        return {"image": self.image, "top": [{"index": i, "name": n, "prob": p} for i, n, p in self.top]}


def load_model(
    checkpoint: str | os.PathLike | None = None,
    hub: str | None = None,
    hub_weights: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """Exactly one of ``checkpoint`` (this project's checkpoint/export) or ``hub`` (a MEAL V2 name)."""
    if (checkpoint is None) == (hub is None):
        raise PredictError("give exactly one of --checkpoint PATH or --hub NAME")
    if hub is None and hub_weights:
        raise PredictError("--hub-weights applies to --hub models only")
    if checkpoint is not None:
        return load_checkpoint_model(checkpoint, device=device)
    return load_hub_model(hub, pretrained=hub_weights or True, device=device)


def class_names(loaded: LoadedModel, manifest: str | os.PathLike | None = None) -> list[str]:
    """The checkpoint's class names, else the manifest's, else ImageNet's (1000 classes), else "class i"."""
    num_classes = int(loaded.meta["num_classes"])
    if manifest:
        names = list(load_manifest(manifest).class_names)
        if len(names) != num_classes:
            raise PredictError(f"manifest {manifest} has {len(names)} classes but the model has {num_classes}")
        if loaded.class_names and tuple(names) != tuple(loaded.class_names):
            raise PredictError(
                f"manifest {manifest} lists classes {names[:5]}... but the model was trained on "
                f"{list(loaded.class_names)[:5]}...; leave out --manifest to use the model's own names"
            )
        return names
    if loaded.class_names:
        return list(loaded.class_names)
    if num_classes == IMAGENET_CLASSES:
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        return [info.index_to_description(i) for i in range(num_classes)]
    return [f"class {i}" for i in range(num_classes)]


def check_images(paths: Sequence[str | os.PathLike]) -> None:
    """Fail before loading a model if an input is missing."""
    for p in paths:
        path = Path(p)
        if not path.exists():
            raise ImageError(path, "no such file")
        if not path.is_file():
            raise ImageError(path, "not a file")


def preprocess_image(path: str | os.PathLike, pre: Preprocess) -> torch.Tensor:
    """uint8 [3, S, S]: the evaluation centre crop of one image at the model's input size."""
    return preprocess_decoded(decode(path), pre)


def preprocess_decoded(image: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """:func:`preprocess_image` of an image already decoded (uint8 [3, H, W])."""
    box = centre_box(int(image.shape[2]), int(image.shape[1]), pre.crop_pct)
    return render_crops(image, [box], [0], pre.input_size, pre.interpolation)[0]


@torch.no_grad()
def top_classes(loaded: LoadedModel, pixels: torch.Tensor, names: Sequence[str], topk: int) -> list[list[tuple[int, str, float]]]:
    """(class index, name, probability) of the ``topk`` most likely classes of each preprocessed uint8 [B, 3, S, S]."""
    model, pre = loaded.model, loaded.preprocess
    device = next(model.parameters()).device
    probs = model(normalize(pixels, pre.mean, pre.std, device)).float().softmax(-1)
    values, indices = probs.topk(min(topk, len(names)), dim=-1)
    return [[(i, names[i], v) for i, v in zip(ix, vs)] for vs, ix in zip(values.tolist(), indices.tolist())]


@torch.no_grad()
def predict(
    loaded: LoadedModel,
    paths: Sequence[str | os.PathLike],
    names: Sequence[str],
    topk: int = 5,
    batch_size: int = 32,
) -> list[Prediction]:
    if topk < 1:
        raise PredictError(f"--topk must be >= 1, got {topk}")
    if batch_size < 1:
        raise PredictError(f"--batch-size must be >= 1, got {batch_size}")
    out: list[Prediction] = []
    for start in range(0, len(paths), batch_size):
        chunk = list(paths[start : start + batch_size])
        pixels = torch.stack([preprocess_image(p, loaded.preprocess) for p in chunk])
        out += [Prediction(str(p), tuple(top)) for p, top in zip(chunk, top_classes(loaded, pixels, names, topk))]
    return out


def run_predict(
    images: Sequence[str | os.PathLike],
    checkpoint: str | os.PathLike | None = None,
    hub: str | None = None,
    hub_weights: str | os.PathLike | None = None,
    manifest: str | os.PathLike | None = None,
    topk: int = 5,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
) -> list[Prediction]:
    """`pipeline predict`: the images checked, the model loaded, the top-k classes of each image."""
    if not images:
        raise PredictError("no images given")
    check_images(images)
    loaded = load_model(checkpoint, hub, hub_weights, device)
    return predict(loaded, images, class_names(loaded, manifest), topk, batch_size)


def format_predictions(predictions: Sequence[Prediction]) -> str:
    lines = []
    for pred in predictions:
        lines.append(pred.image)
        width = len(str(max((i for i, _, _ in pred.top), default=0)))
        for rank, (index, name, prob) in enumerate(pred.top, 1):
            lines.append(f"  {rank}. {100 * prob:6.2f}%  {index:>{width}}  {name}")
    return "\n".join(lines)
