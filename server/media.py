"""Image URLs in requests -> RGB images, with size checks before any pixel is decoded."""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings

from PIL import Image

from model.images import to_rgb

from .errors import APIError, bad_request
from .fetch import FetchPolicy, fetch_image

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,", re.I)
ALLOWED_FORMATS = {"PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "MPO"}
# The decoders Image.open may try (MPO comes through JPEG's): no other plugin parses client bytes.
_OPEN_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
# Resizing cost grows with the longest side whatever the pixel count (a 64M x 1 strip: minutes, GBs
# of filter taps); 65535 is JPEG's own limit.
MAX_IMAGE_SIDE = 65535


def is_remote(url: str) -> bool:
    """An http(s) URL (fetched over the network, when allowed)."""
    return url[:8].lower().startswith(("http://", "https://"))


def image_bytes(url: str, *, param: str, policy: FetchPolicy | None) -> bytes:
    """A `data:` URL always; `http(s)` only with a fetch policy; anything else is refused."""
    lowered = url[:16].lower()
    if lowered.startswith("data:"):
        return decode_data_url(url, param=param)
    if lowered.startswith(("http://", "https://")):
        if policy is None:
            raise bad_request("image URLs are disabled on this server; send the image as a data: URL", param=param,
                              code="image_url_disabled")
        return fetch_image(url, policy, param=param)
    raise bad_request("image_url must be a data: URL (data:image/png;base64,...)", param=param,
                      code="invalid_image_url")


def decode_data_url(url: str, *, param: str) -> bytes:
    m = _DATA_URL.match(url)
    if not m:
        raise bad_request("malformed data: URL", param=param, code="invalid_image_url")
    if not m.group("b64"):
        raise bad_request("only base64 data: URLs are supported", param=param, code="invalid_image_url")
    try:
        return _b64decode(url[m.end():])
    except (binascii.Error, ValueError):
        raise bad_request("image data is not valid base64", param=param, code="invalid_image") from None


_B64_CHUNK = 1 << 18  # characters, a multiple of 4


def _b64decode(payload: str) -> bytes:
    """base64 in 256 KiB slices: one call on a 12 MB payload holds the GIL for ~40 ms, which the
    event loop (health checks, other streams) would wait out; slices let it in between."""
    if len(payload) <= _B64_CHUNK or any(c in payload for c in "\n\r \t"):
        return base64.b64decode(payload, validate=False)  # short, or wrapped lines: one call
    return b"".join(base64.b64decode(payload[i:i + _B64_CHUNK], validate=False)
                    for i in range(0, len(payload), _B64_CHUNK))


def open_image(data: bytes, *, max_pixels: int, param: str, max_side: int = MAX_IMAGE_SIDE) -> Image.Image:
    """Read the header, check the size, then decode. Pillow's own bomb guard stays on."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=_OPEN_FORMATS)
            if img.format not in ALLOWED_FORMATS:
                raise bad_request(f"unsupported image format {img.format}", param=param, code="invalid_image")
            w, h = img.size
            if w < 1 or h < 1:
                raise bad_request(f"image is {w} x {h}: it has no pixels", param=param, code="invalid_image")
            if w * h > max_pixels:
                raise APIError(400, f"image is {w} x {h} = {w * h} pixels; the limit is {max_pixels}", param=param,
                               code="image_too_large")
            if max(w, h) > max_side:
                raise APIError(400, f"image is {w} x {h}; no side may exceed {max_side} pixels", param=param,
                               code="image_too_large")
            img.load()
            return to_rgb(img)
    except APIError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise APIError(400, "image is too large to decode", param=param, code="image_too_large") from None
    except Exception as e:  # noqa: BLE001 - any decoder failure is the client's bad image
        raise bad_request(f"cannot decode image: {type(e).__name__}", param=param, code="invalid_image") from None
