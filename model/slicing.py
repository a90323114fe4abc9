"""SliME's image slicing: grid choice, global view, local tiles and token counts (spec section 2).

PIL, numpy and the compiled Pillow-exact bicubic resize (`pillow_bicubic.py`): no torch, no model.
The token-count functions here are what the scheduler uses before any GPU work, so they must agree
with what the model produces (tests check that).
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .pillow_bicubic import resize_many

VIEW_SIZE = 336  # CLIP input side S
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_GRID_CELLS = 6


def _factor_pairs(m: int) -> list[tuple[int, int]]:
    """(cols, rows) with cols * rows == m, cols ascending."""
    return [(c, m // c) for c in range(1, m + 1) if m % c == 0]


def candidate_grids(width: int, height: int, *, view_size: int = VIEW_SIZE) -> list[tuple[int, int]]:
    """Candidate (cols, rows) grids in the reference's enumeration order."""
    n = math.ceil(width * height / (view_size * view_size))
    if n > MAX_GRID_CELLS:
        n = MAX_GRID_CELLS
    elif n == 1:
        n = 2
    counts = [n, n + 1] if n <= 2 else [n - 1, n, n + 1]
    return [pair for m in counts for pair in _factor_pairs(m)]


def choose_grid(width: int, height: int, *, view_size: int = VIEW_SIZE) -> tuple[int, int]:
    """The (cols, rows) grid that keeps the most resolution, then wastes the least; first on ties."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width} x {height}")
    best: tuple[int, int] | None = None
    best_effective, best_wasted = 0, math.inf
    for cols, rows in candidate_grids(width, height, view_size=view_size):
        tw, th = cols * view_size, rows * view_size
        f = min(tw / width, th / height)
        effective = min(int(width * f) * int(height * f), width * height)
        wasted = tw * th - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (cols, rows), effective, wasted
    assert best is not None
    return best


def resized_size(width: int, height: int, target: tuple[int, int]) -> tuple[int, int]:
    """Size of the image inside the padded canvas; keeps the reference's float-operation order."""
    tw, th = target
    sw, sh = tw / width, th / height
    if sw < sh:
        return tw, min(math.ceil(height * sw), th)
    return min(math.ceil(width * sh), tw), th


@dataclass(frozen=True)
class ImageTokenCount:
    """Tokens an image contributes before selection (a pure function of its size)."""

    grid: tuple[int, int]  # (cols, rows)
    num_views: int  # 1 global + cols * rows tiles
    global_tokens: int  # 576
    local_tokens: int  # cols * rows * 144, before selection


def count_image_tokens(width: int, height: int, *, num_patches: int = 576, local_per_tile: int = 144,
                       has_local: bool = True, view_size: int = VIEW_SIZE) -> ImageTokenCount:
    cols, rows = choose_grid(width, height, view_size=view_size)
    tiles = cols * rows
    return ImageTokenCount(grid=(cols, rows), num_views=1 + tiles, global_tokens=num_patches,
                           local_tokens=tiles * local_per_tile if has_local else 0)


_POOL: ThreadPoolExecutor | None = None
_POOL_WORKERS = max(2, min(4, os.cpu_count() or 2))
_PARALLEL_MIN_PIXELS = 1_000_000  # below this, threads cost more than they save


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=_POOL_WORKERS, thread_name_prefix="slime-resize")
    return _POOL


def resize(image: Image.Image, sizes: list[tuple[int, int]], parallel: bool = True) -> list[np.ndarray]:
    """`[np.asarray(image.resize(size, BICUBIC)) for size in sizes]`, bit for bit (`model.pillow_bicubic`),
    split over the resize threads for large photos (the kernels release the GIL)."""
    if not parallel or image.width * image.height < _PARALLEL_MIN_PIXELS:
        return resize_many(image, sizes)
    return resize_many(image, sizes, _pool(), _POOL_WORKERS)


def slice_image(image: Image.Image, *, view_size: int = VIEW_SIZE,
                parallel: bool = True) -> tuple[np.ndarray, tuple[int, int]]:
    """RGB image -> (`[1 + cols*rows, S, S, 3]` uint8: the global view, then the tiles of the padded
    canvas in raster order; (cols, rows))."""
    width, height = image.size
    cols, rows = choose_grid(width, height, view_size=view_size)
    tw, th = cols * view_size, rows * view_size
    nw, nh = resized_size(width, height, (tw, th))
    resized, global_view = resize(image, [(nw, nh), (view_size, view_size)], parallel)
    views = np.zeros((1 + cols * rows, view_size, view_size, 3), np.uint8)  # black padding, as the reference
    views[0] = global_view
    # The resized photo sits centred on a black canvas; tile t covers canvas rows r*S.., cols c*S..
    left, top = (tw - nw) // 2, (th - nh) // 2
    for t in range(cols * rows):
        r, c = divmod(t, cols)
        y0, x0 = r * view_size, c * view_size
        ya, yb = max(y0, top), min(y0 + view_size, top + nh)
        xa, xb = max(x0, left), min(x0 + view_size, left + nw)
        if ya < yb and xa < xb:
            views[1 + t, ya - y0:yb - y0, xa - x0:xb - x0] = resized[ya - top:yb - top, xa - left:xb - left]
    return views, (cols, rows)


@dataclass(frozen=True)
class ImageNorm:
    """The CLIP processor's normalisation (from the tower's `preprocessor_config.json`)."""

    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD


CLIP_NORM = ImageNorm()
_LUTS: dict[ImageNorm, np.ndarray] = {}


def normalisation_lut(norm: ImageNorm = CLIP_NORM) -> np.ndarray:
    """[3, 256] float32: CLIP's rescale (float64 x/255 -> float32) then (x - mean) / std in float32.

    Every uint8 value maps to one float, so a table lookup gives the CLIP processor's exact numbers.
    """
    lut = _LUTS.get(norm)
    if lut is None:
        scaled = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
        mean = np.asarray(norm.mean, dtype=np.float32)[:, None]
        std = np.asarray(norm.std, dtype=np.float32)[:, None]
        lut = _LUTS[norm] = ((scaled[None, :] - mean) / std).astype(np.float32)
    return lut


def normalise_views(views, norm: ImageNorm = CLIP_NORM) -> np.ndarray:
    """`[V, S, S, 3]` uint8 (or a list of S x S images) -> `[V, 3, S, S]` float32 normalised pixels."""
    lut = normalisation_lut(norm)
    arr = views if isinstance(views, np.ndarray) else np.stack([np.asarray(v, dtype=np.uint8) for v in views])
    out = np.empty((arr.shape[0], 3, arr.shape[1], arr.shape[2]), dtype=np.float32)
    for c in range(3):
        out[:, c] = lut[c][arr[..., c]]
    return out


def preprocess(image: Image.Image, *, view_size: int = VIEW_SIZE, norm: ImageNorm = CLIP_NORM,
               parallel: bool = True) -> tuple[np.ndarray, tuple[int, int]]:
    """RGB image -> (`[1 + cols*rows, 3, S, S]` float32, (cols, rows)). `parallel`: large photos
    use the resize threads."""
    views, grid = slice_image(image, view_size=view_size, parallel=parallel)
    return normalise_views(views, norm), grid


def preprocess_single(image: Image.Image, *, pad: bool, view_size: int = VIEW_SIZE,
                      norm: ImageNorm = CLIP_NORM) -> np.ndarray:
    """LLaVA-1.5 single view: (`pad`: centre on a mean-colour square) then CLIP's shortest-edge
    resize and centre crop -> `[1, 3, S, S]`."""
    if pad and image.width != image.height:
        side = max(image.size)
        fill = tuple(int(m * 255) for m in norm.mean)
        square = Image.new("RGB", (side, side), fill)
        square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        image = square
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(view_size * long / short)
    size = (view_size, new_long) if w <= h else (new_long, view_size)
    arr = resize(image, [size])[0] if size != image.size else np.asarray(image)
    left, top = (size[0] - view_size) // 2, (size[1] - view_size) // 2
    return normalise_views(arr[None, top:top + view_size, left:left + view_size], norm)
