"""Decoding user images into the RGB PIL images the slicer expects."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps


def to_rgb(image: Image.Image) -> Image.Image:
    """Apply EXIF orientation, take the first frame and convert any mode to 8-bit RGB.

    RGBA drops alpha and keeps the stored colour, as the reference's `convert("RGB")` does.
    """
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)
    image = ImageOps.exif_transpose(image) or image
    mode = image.mode
    if mode == "RGB":
        return image.copy() if image.readonly else image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of clipping.
        arr = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr8 = np.clip(np.round(arr * (255.0 / peak)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    return image.convert("RGB")  # P, L, LA, RGBA, CMYK, YCbCr, 1, F ...


def load_image(source: str | bytes | Image.Image) -> Image.Image:
    """Path, raw bytes or PIL image -> RGB image."""
    if isinstance(source, Image.Image):
        return to_rgb(source)
    if isinstance(source, (bytes, bytearray)):
        img = Image.open(io.BytesIO(source))
    else:
        img = Image.open(source)
    img.load()
    return to_rgb(img)
