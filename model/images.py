"""Decoding user images into the RGB PIL images the slicer expects."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps


def to_rgb(image: Image.Image) -> Image.Image:
    """Apply EXIF orientation, take the first frame and convert any mode to 8-bit RGB.

    RGBA drops alpha and keeps the stored colour, as the reference's `convert("RGB")` does.
    """
    if image.tell() != 0:  # not `n_frames`: counting walks every frame (quadratic for TIFF pages)
        image.seek(0)
    image = ImageOps.exif_transpose(image) or image
    mode = image.mode
    if mode == "RGB":
        return image.copy() if image.readonly else image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of clipping (32-bit values above 255 are
        # read as 16-bit). A table, not float64 arithmetic: a 64-megapixel image needed 1.5 GB.
        arr = np.asarray(image)
        if mode.startswith("I;16") or arr.max(initial=0) > 255:
            arr8 = _scale_16_to_8()[arr if mode.startswith("I;16") else np.clip(arr, 0, 65535)]
        else:
            arr8 = np.clip(arr, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8).convert("RGB")
    if mode == "La":  # premultiplied: Pillow has no La -> RGB path
        image = image.convert("LA")
    return image.convert("RGB")  # P, L, LA, RGBA, CMYK, YCbCr, 1, F ...


_LUT_16: np.ndarray | None = None


def _scale_16_to_8() -> np.ndarray:
    """[65536] uint8: round(x * 255 / 65535), in float64 as the arithmetic it replaces."""
    global _LUT_16
    if _LUT_16 is None:
        _LUT_16 = np.round(np.arange(65536, dtype=np.float64) * (255.0 / 65535.0)).astype(np.uint8)
    return _LUT_16


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
