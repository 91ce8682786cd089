"""Pixels into ``<img src="data:...">``: pages embed their images, so no route serves files."""
from __future__ import annotations

import base64
import io

from PIL import Image


def png_data_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chw_to_pil(pixels) -> Image.Image:
    """uint8 torch [3, H, W] -> PIL RGB."""
    return Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy())
