"""The Predict page: one uploaded image through ``stage2_student_distill.predict``.

The upload is written to a private temporary file and read back by the same
code as ``pipeline predict`` (``common.images`` decoding with its checks, the
model's own ``Preprocess``), so the page and the command cannot disagree.
Limits checked before decoding: the request size (Flask's MAX_CONTENT_LENGTH)
and the pixel count read from the header, so a small file that decodes to a
huge image is refused without allocating it.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from common.images import ImageError, image_size
from common.serve.pictures import chw_to_pil, png_data_uri
from stage2_student_distill.hub import LoadedModel
from stage2_student_distill.predict import predict, preprocess_image

TOPK = 5


class UploadError(ValueError):
    """An upload the page refuses; the message is shown on the page."""


def describe_model(loaded: LoadedModel, names: list[str]) -> dict[str, Any]:
    meta, pre = loaded.meta, loaded.preprocess
    return {
        "name": meta["model"],
        "source": meta.get("source", ""),
        "num_classes": int(meta["num_classes"]),
        "preprocess": f"{pre.input_size} px, {pre.interpolation}, centre crop {pre.crop_pct:g} of the shorter side, "
                      f"mean {tuple(round(v, 3) for v in pre.mean)} std {tuple(round(v, 3) for v in pre.std)}",
        "example_names": names[:5],
    }


def predict_upload(loaded: LoadedModel, names: list[str], data: bytes, filename: str, max_pixels: int) -> dict:
    """{"top": [(name, prob)...], "seen": data URI of the model's input} or UploadError."""
    if not data:
        raise UploadError("no image received: choose or drop an image file")
    shown = Path(filename or "upload").name
    with tempfile.TemporaryDirectory(prefix="pipeline-serve-") as tmp:
        path = Path(tmp) / "upload"
        path.write_bytes(data)
        try:
            w, h = image_size(path)
            if w * h > max_pixels:
                raise UploadError(f"{shown}: {w}x{h} pixels is more than this server accepts "
                                  f"({max_pixels:,} pixels, --max-pixels); send a smaller image")
            (pred,) = predict(loaded, [path], names, topk=TOPK)
            seen = png_data_uri(chw_to_pil(preprocess_image(path, loaded.preprocess)))
        except ImageError as e:  # its message names the temporary file; name the upload instead
            raise UploadError(f"{shown}: {e.reason}") from None
    return {"image": shown, "size": f"{w}x{h}", "top": [(n, p) for _, n, p in pred.top], "seen": seen}
