"""The Predict page: one uploaded image through ``stage2_student_distill.predict``.

The upload is written to a private temporary file and read back by the same
code as ``pipeline predict`` (``common.images`` decoding with its checks, the
model's own ``Preprocess``), so the page and the command cannot disagree.
Limits checked before decoding: the request size (Flask's MAX_CONTENT_LENGTH)
and the pixel count read from the header (``image_header``: no pixel and no
EXIF is read, as Pillow decodes a whole PNG to find its EXIF), so a small file
that decodes to a huge image is refused without allocating it. The image is
then decoded once, for both the model and the picture of what it saw.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from common.images import ImageError, image_header
from common.render import decode
from stage2_student_distill.app.serve.pictures import chw_to_pil, png_data_uri
from stage2_student_distill.hub import LoadedModel
from stage2_student_distill.predict import preprocess_decoded, top_classes

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
            header = image_header(path)
            if header.pixels > max_pixels:
                raise UploadError(f"{shown}: {header.width}x{header.height} pixels is more than this server accepts "
                                  f"({max_pixels:,} pixels, --max-pixels); send a smaller image")
            image = decode(path)
        except ImageError as e:  # its message names the temporary file; name the upload instead
            raise UploadError(f"{shown}: {e.reason}") from None
    pixels = preprocess_decoded(image, loaded.preprocess)
    (top,) = top_classes(loaded, pixels[None], names, TOPK)
    return {"image": shown, "size": f"{image.shape[2]}x{image.shape[1]}", "top": [(n, p) for _, n, p in top],
            "seen": png_data_uri(chw_to_pil(pixels))}
