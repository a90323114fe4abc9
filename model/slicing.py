"""SliME's image slicing: grid choice, global view, local tiles and token counts (spec section 2).

Pure PIL/numpy: no torch, no model. The token-count functions here are what the scheduler uses
before any GPU work, so they must agree with what the model produces (tests check that).
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image

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
_PARALLEL_MIN_PIXELS = 1_000_000  # below this, threads cost more than they save


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2)), thread_name_prefix="slime-resize")
    return _POOL


def _strips(n: int, parts: int) -> list[tuple[int, int]]:
    bounds = [n * i // parts for i in range(parts + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(parts) if bounds[i + 1] > bounds[i]]


def resize_bicubic(images: list[Image.Image], sizes: list[tuple[int, int]], parts: int = 0) -> list[Image.Image]:
    """`[im.resize(size, BICUBIC) for ...]`, bit for bit, computed in parallel strips.

    Pillow resamples horizontally, then vertically, through an 8-bit intermediate. Every output
    row of the horizontal pass depends on one input row and every column of the vertical pass on
    one column, so both passes split into strips that give exactly Pillow's pixels, and Pillow
    releases the GIL while it resamples.
    """
    if all(im.width * im.height < _PARALLEL_MIN_PIXELS for im in images):
        return [im.resize(size, Image.Resampling.BICUBIC) for im, size in zip(images, sizes)]
    pool = _pool()
    parts = parts or pool._max_workers

    def run_pass(ims: list[Image.Image], targets: list[int], horizontal: bool) -> list[Image.Image]:
        # Submit every strip of every image first, so that the workers never idle between images.
        plans = []
        for im, target in zip(ims, targets):
            if target == (im.width if horizontal else im.height):
                plans.append((im, None))
                continue
            jobs = []
            for a, b in _strips(im.height if horizontal else im.width, parts):
                box = (0, a, im.width, b) if horizontal else (a, 0, b, im.height)
                size = (target, b - a) if horizontal else (b - a, target)
                jobs.append((a, pool.submit(lambda box=box, size=size, im=im: im.crop(box).resize(
                    size, Image.Resampling.BICUBIC))))
            plans.append((im, jobs))
        out = []
        for (im, jobs), target in zip(plans, targets):
            if jobs is None:
                out.append(im)
                continue
            full = Image.new(im.mode, (target, im.height) if horizontal else (im.width, target))
            for a, job in jobs:
                full.paste(job.result(), (0, a) if horizontal else (a, 0))
            out.append(full)
        return out

    wide = run_pass(images, [size[0] for size in sizes], horizontal=True)
    return run_pass(wide, [size[1] for size in sizes], horizontal=False)


def slice_image(image: Image.Image, *, view_size: int = VIEW_SIZE) -> tuple[list[Image.Image], tuple[int, int]]:
    """RGB image -> ([global view, tile_0, ..., tile_{P-1}], (cols, rows)), tiles in raster order."""
    width, height = image.size
    cols, rows = choose_grid(width, height, view_size=view_size)
    tw, th = cols * view_size, rows * view_size
    nw, nh = resized_size(width, height, (tw, th))
    resized, global_view = resize_bicubic([image, image], [(nw, nh), (view_size, view_size)])
    canvas = Image.new("RGB", (tw, th), (0, 0, 0))
    canvas.paste(resized, ((tw - nw) // 2, (th - nh) // 2))
    tiles = [canvas.crop((c * view_size, r * view_size, (c + 1) * view_size, (r + 1) * view_size))
             for r in range(rows) for c in range(cols)]
    return [global_view, *tiles], (cols, rows)


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


def normalise_views(views: list[Image.Image], norm: ImageNorm = CLIP_NORM) -> np.ndarray:
    """Views of S x S -> `[views, 3, S, S]` float32 normalised pixels."""
    lut = normalisation_lut(norm)
    arr = np.stack([np.asarray(v, dtype=np.uint8) for v in views])  # [V, S, S, 3]
    out = np.empty((arr.shape[0], 3, arr.shape[1], arr.shape[2]), dtype=np.float32)
    for c in range(3):
        out[:, c] = lut[c][arr[..., c]]
    return out


def preprocess(image: Image.Image, *, view_size: int = VIEW_SIZE,
               norm: ImageNorm = CLIP_NORM) -> tuple[np.ndarray, tuple[int, int]]:
    """RGB image -> (`[1 + cols*rows, 3, S, S]` float32, (cols, rows))."""
    views, grid = slice_image(image, view_size=view_size)
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
    if size != image.size:
        image = image.resize(size, Image.Resampling.BICUBIC)
    left, top = (image.width - view_size) // 2, (image.height - view_size) // 2
    image = image.crop((left, top, left + view_size, top + view_size))
    return normalise_views([image], norm)
