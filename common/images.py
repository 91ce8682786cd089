"""Decoding one image file into the frame every stage agrees on.

The manifest records width/height *after* EXIF orientation and crop boxes are
drawn in that frame, so every reader must orient the same way: here, with
``ImageOps.exif_transpose`` (the EXIF Orientation tag, as Pillow reads it).
Pixels come out as 8-bit RGB whatever the file holds (grayscale, palette,
RGBA, CMYK, 16-bit), because the models take 3-channel uint8 input.

Every failure is an :class:`ImageError` naming the file and the reason, so a
bad file deep in a dataset is reported as data, not as a Pillow traceback.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from common.errors import PipelineError

# Orientation tag values that turn the picture by 90 degrees (width <-> height).
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})


class ImageError(PipelineError):
    """An image file cannot be decoded; the message names the file and why."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(str(path), reason)  # both in args, so it survives pickling to worker processes
        self.path = str(path)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def open_image(path: str | os.PathLike) -> Image.Image:
    """Fully decode ``path`` to an EXIF-oriented 8-bit RGB image."""
    path = Path(path)
    _check_not_empty(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise ImageError(path, f"cannot read file ({e.strerror or e})") from e
    with f:
        img = _load(f, str(path))
    with img:
        try:
            oriented = ImageOps.exif_transpose(img)
        except (OSError, ValueError, SyntaxError) as e:
            raise ImageError(path, f"malformed EXIF data ({e})") from e
    try:
        return _to_rgb8(oriented)
    except ValueError as e:
        raise ImageError(path, f"unsupported colour mode {oriented.mode!r} ({e})") from e


def decoded_size(data: bytes, name: str) -> tuple[int, int]:
    """(width, height) after EXIF orientation, from a *full* decode of ``data``.

    The manifest builder uses this on bytes it has already read for hashing:
    one read per file, and a file that only decodes half-way is caught here
    rather than in the middle of a teacher-cache run.
    """
    if not data:
        raise ImageError(name, "zero-byte file")
    with _load(io.BytesIO(data), name) as img:
        return _oriented_size(img, name)


@dataclass(frozen=True)
class ImageHeader:
    """What ``Image.open`` reads before any pixel: the stored size (before EXIF orientation) and mode."""

    width: int
    height: int
    mode: str

    @property
    def pixels(self) -> int:  # the same in either orientation
        return self.width * self.height


def image_header(path: str | os.PathLike) -> ImageHeader:
    """The header of ``path``, without decoding pixels or reading EXIF.

    For a limit checked before any decode: Pillow's ``getexif`` (which the
    orientation needs) decodes a whole PNG to find an eXIf chunk after the
    pixel data.
    """
    path = Path(path)
    _check_not_empty(path)
    with _open(path, str(path)) as img:
        return ImageHeader(img.width, img.height, img.mode)


def _check_not_empty(path: Path) -> None:
    try:
        size = path.stat().st_size
    except OSError as e:
        raise ImageError(path, f"cannot read file ({e.strerror or e})") from e
    if size == 0:
        raise ImageError(path, "zero-byte file")


def _open(fp: str | os.PathLike | BinaryIO, name: str) -> Image.Image:
    """``Image.open`` (header only) with its failures named."""
    try:
        return Image.open(fp)
    except UnidentifiedImageError as e:
        raise ImageError(name, "not an image file (Pillow cannot identify its format)") from e
    except Image.DecompressionBombError as e:
        raise ImageError(name, f"image too large to decode safely ({e})") from e
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError(name, f"truncated or corrupt image ({e})") from e


def _load(fp: BinaryIO, name: str) -> Image.Image:
    """Open and decode every pixel, so truncation is caught now."""
    img = _open(fp, name)
    try:
        img.load()
    except Image.DecompressionBombError as e:
        img.close()
        raise ImageError(name, f"image too large to decode safely ({e})") from e
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        img.close()
        raise ImageError(name, f"truncated or corrupt image ({e})") from e
    return img


def _oriented_size(img: Image.Image, name: str) -> tuple[int, int]:
    """Size after ``ImageOps.exif_transpose``, which reads this same EXIF tag."""
    try:
        orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError(name, f"malformed EXIF data ({e})") from e
    width, height = img.size
    if orientation in _SWAPPING_ORIENTATIONS:
        return height, width
    return width, height


def _to_rgb8(img: Image.Image) -> Image.Image:
    """Convert any decoded mode to 8-bit RGB.

    Pillow's own ``convert`` *clips* 16-bit samples to 0..255 instead of
    scaling them, which turns a 16-bit PNG almost white; keep the high byte
    instead (what libpng's strip_16 and OpenCV do). Alpha is dropped, as the
    torchvision loader and DALI's RGB decode do, so both stages see the same
    pixels.
    """
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I"):  # I;16, I;16B, I;16L and 32-bit I holding 16-bit data
        wide = np.asarray(img).astype(np.int64)
        img = Image.fromarray((np.clip(wide, 0, 65535) >> 8).astype(np.uint8))
    elif img.mode == "P":
        img = img.convert("RGBA")  # resolves palette transparency without a warning
    return img.convert("RGB")
