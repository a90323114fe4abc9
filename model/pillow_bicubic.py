"""Pillow's bicubic resize, bit for bit, as compiled loops that vectorise.

Pillow (`Image.resize(size, BICUBIC)` on RGB) resamples horizontally through an 8-bit
intermediate, then vertically, with 22-bit fixed-point weights and a scalar loop per output pixel.
Here the same integer arithmetic runs on blocks of rows turned on their side (`[W, rows*3]`), so
that each weight multiplies a contiguous run of pixels (SIMD), and one pass over the photo feeds
every output size at once (SliME needs two: the padded canvas and the global view).

Without numba, `resize_many` falls back to Pillow itself: same pixels, just slower.
"""

from __future__ import annotations

import math
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
from PIL import Image

try:
    import numba
except ImportError:  # pragma: no cover - numba is a dependency; this keeps a broken install serving
    numba = None

PRECISION_BITS = 22  # Pillow's, for 8-bit images: 32 - 8 - 2
STRIP_ROWS = 32  # rows turned on their side at a time: [W, 96] bytes stays in L2 for a 4032-wide photo
BICUBIC_SUPPORT = 2.0


@dataclass(frozen=True)
class Weights:
    """Fixed-point filter for one axis: output i reads inputs `first[i] : first[i] + count[i]`."""

    first: np.ndarray  # [out] int32
    count: np.ndarray  # [out] int32
    taps: np.ndarray  # [out, ksize] int32, Pillow's rounding of its normalised float64 weights


def _bicubic(t: np.ndarray) -> np.ndarray:
    # Keys' cubic with a = -0.5, each branch in Pillow's operation order (float64, no FMA).
    t = np.abs(t)
    near = ((1.5 * t - 2.5) * t) * t + 1
    far = (((t - 5) * t + 8) * t - 4) * -0.5
    return np.where(t < 1.0, near, np.where(t < 2.0, far, 0.0))


def bicubic_weights(in_size: int, out_size: int) -> Weights:
    """The weights Pillow computes for resampling `in_size` pixels to `out_size` (whole-image box).

    Every float64 operation happens in Pillow's order, vectorised over the outputs only, so the
    rounded integer taps are exactly Pillow's.
    """
    scale = float(np.float32(in_size)) / out_size  # Pillow takes the box edges as C floats
    filterscale = max(scale, 1.0)
    support = BICUBIC_SUPPORT * filterscale
    ksize = math.ceil(support) * 2 + 1
    center = (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    first = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    count = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - first
    inv = 1.0 / filterscale
    taps = np.zeros((out_size, ksize))
    total = np.zeros(out_size)
    for k in range(ksize):  # the sum runs tap by tap, as in Pillow
        live = k < count
        w = np.where(live, _bicubic(((k + first).astype(np.float64) - center + 0.5) * inv), 0.0)
        taps[:, k] = w
        total = np.where(live, total + w, total)
    taps = np.where(total[:, None] != 0.0, taps / np.where(total == 0.0, 1.0, total)[:, None], taps)
    fixed = taps * (1 << PRECISION_BITS)
    taps = np.where(taps < 0, np.trunc(-0.5 + fixed), np.trunc(0.5 + fixed))
    return Weights(first.astype(np.int32), count.astype(np.int32), taps.astype(np.int32))


def _jit(fn):
    """Compiled without the GIL; cached on disk (`NUMBA_CACHE_DIR`, else beside this file or in the
    user's cache) so that a restart loads the kernels in well under a second instead of compiling
    them for ~1.5 s. Numba refuses `cache=True` where no such directory is writable: then each
    process compiles its own."""
    try:
        return numba.njit(nogil=True, cache=True)(fn)
    except RuntimeError:
        return numba.njit(nogil=True)(fn)


if numba is not None:
    # The sums below are Pillow's: they start at half of 2^22 (rounding), and every partial sum
    # fits an int32 as in its C loops (numba widens each product to int64; the stores narrow).

    @_jit
    def _weighted_rows(acc, rows, start, count, taps):  # pragma: no cover - compiled
        """acc[:] = 2^21 + sum_k taps[k] * rows[start + k, :len(acc)] (rows of uint8; SIMD along j)."""
        n = acc.shape[0]
        for j in range(n):
            acc[j] = np.int32(1 << (PRECISION_BITS - 1))
        for k in range(count):
            w = taps[k]
            src = rows[start + k]
            for j in range(n):
                acc[j] += w * np.int32(src[j])

    @_jit
    def _sideways(strip, buf):  # pragma: no cover - compiled
        """[rows, W, 4] RGBX -> buf[:W, :rows*3]: buf[x, 3r + c] = strip[r, x, c]."""
        rows, width = strip.shape[0], strip.shape[1]
        for r in range(rows):
            row = strip[r].reshape(width * 4)
            for x in range(width):
                buf[x, 3 * r] = row[4 * x]
                buf[x, 3 * r + 1] = row[4 * x + 1]
                buf[x, 3 * r + 2] = row[4 * x + 2]

    @_jit
    def _horizontal(buf, rows, first, count, taps, out, out_row):  # pragma: no cover - compiled
        """One strip's horizontal pass: out[out_row + r, i, c] from buf (see `_sideways`)."""
        acc = np.empty(rows * 3, np.int32)
        for i in range(first.shape[0]):
            _weighted_rows(acc, buf, first[i], count[i], taps[i])
            for r in range(rows):
                for c in range(3):
                    v = acc[3 * r + c] >> PRECISION_BITS
                    out[out_row + r, i, c] = 0 if v < 0 else (255 if v > 255 else v)

    @_jit
    def _vertical(src, lo, hi, first, count, taps, out):  # pragma: no cover - compiled
        """Output rows lo..hi of the vertical pass; src [rows, W, 3], out [out_rows, W, 3]."""
        n = src.shape[1] * 3
        flat = src.reshape(src.shape[0], n)
        dst = out.reshape(out.shape[0], n)
        acc = np.empty(n, np.int32)
        for i in range(lo, hi):
            _weighted_rows(acc, flat, first[i], count[i], taps[i])
            for j in range(n):
                v = acc[j] >> PRECISION_BITS
                dst[i, j] = 0 if v < 0 else (255 if v > 255 else v)


def _rgbx_rows(image: Image.Image, top: int, bottom: int) -> np.ndarray:
    """Rows top..bottom of an RGB image as [rows, W, 4] uint8 (the 4th byte unused)."""
    rows = _rgbx_from_storage(image, top, bottom)
    if rows is None:  # Pillow's internals changed: the public (slower) conversion, same pixels
        rows = np.asarray(image.crop((0, top, image.width, bottom)).convert("RGBA"))
    return rows


def _rgbx_from_storage(image: Image.Image, top: int, bottom: int) -> np.ndarray | None:
    """The rows straight from Pillow's RGBX storage through its raw encoder (not public API): one
    memcpy-like pass, where `np.asarray(image)` repacks to RGB through 16 KB chunks and costs ~80 ms
    on a 12 MP photo. None if that encoder is not there or not as expected."""
    try:
        encoder = Image._getencoder("RGB", "raw", ("RGBX", 0, 1))
        encoder.setimage(image.im, (0, top, image.width, bottom))
        _, status, data = encoder.encode((bottom - top) * image.width * 4)
    except (AttributeError, TypeError, ValueError, OSError):
        return None
    if status != 1 or len(data) != (bottom - top) * image.width * 4:  # not the whole strip at once
        return None
    return np.frombuffer(data, np.uint8).reshape(bottom - top, image.width, 4)


def _split(n: int, parts: int) -> list[tuple[int, int]]:
    bounds = [n * i // parts for i in range(parts + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(parts) if bounds[i + 1] > bounds[i]]


def resize_many(image: Image.Image, sizes: list[tuple[int, int]], pool: Executor | None = None,
                parts: int = 1) -> list[np.ndarray]:
    """`[np.asarray(image.resize(size, BICUBIC)) for size in sizes]` for an RGB image, bit for bit:
    `[H', W', 3]` uint8 arrays. With `pool`, the work is split into `parts` row ranges."""
    if image.mode != "RGB":
        raise ValueError(f"resize_many takes RGB images, got {image.mode}")
    if not sizes:
        return []
    width, height = image.size
    # Pillow resamples photos over 100x taller than wide vertically first (from Python): leave
    # those rare shapes to Pillow itself rather than track its version's pass order.
    if numba is None or height > width * 100:
        return [np.asarray(image.resize(size, Image.Resampling.BICUBIC)) for size in sizes]
    image.load()
    plans = []  # (size, horizontal weights or None, vertical weights or None)
    lo, hi = height, 0  # source rows any output reads
    for w, h in sizes:
        vert = bicubic_weights(height, h) if h != height else None
        plans.append(((w, h), bicubic_weights(width, w) if w != width else None, vert))
        lo = min(lo, int(vert.first[0]) if vert else 0)
        hi = max(hi, int(vert.first[-1] + vert.count[-1]) if vert else height)

    # Horizontal pass into [hi - lo, w, 3] intermediates (or the source rows themselves).
    mids = [np.empty((hi - lo, w, 3), np.uint8) for (w, _), _, _ in plans]

    def horizontal(top: int, bottom: int) -> None:
        buf = np.empty((width, STRIP_ROWS * 3), np.uint8)
        for a in range(top, bottom, STRIP_ROWS):
            b = min(a + STRIP_ROWS, bottom)
            strip = _rgbx_rows(image, a, b)
            sideways = False
            for (_, horiz, _), mid in zip(plans, mids):
                if horiz is None:
                    mid[a - lo:b - lo] = strip[..., :3]
                    continue
                if not sideways:
                    _sideways(strip, buf)
                    sideways = True
                _horizontal(buf, b - a, horiz.first, horiz.count, horiz.taps, mid, a - lo)

    # Split on strip boundaries so that parts never share a strip.
    strips = -(-(hi - lo) // STRIP_ROWS)
    ranges = [(lo + s0 * STRIP_ROWS, min(hi, lo + s1 * STRIP_ROWS)) for s0, s1 in _split(strips, parts)]
    _run(pool, horizontal, ranges)

    outs = []
    jobs = []
    for ((w, h), _, vert), mid in zip(plans, mids):
        if vert is None:
            outs.append(mid)
            continue
        out = np.empty((h, w, 3), np.uint8)
        first = (vert.first - lo).astype(np.int32)
        for a, b in _split(h, parts):
            jobs.append((mid, a, b, first, vert.count, vert.taps, out))
        outs.append(out)
    _run(pool, _vertical, jobs)
    return outs


def _run(pool: Executor | None, fn, jobs: list) -> None:
    if pool is None or len(jobs) < 2:
        for job in jobs:
            fn(*job)
        return
    for future in [pool.submit(fn, *job) for job in jobs]:
        future.result()


def warm_up() -> None:
    """Compile (or load from numba's cache) the kernels now rather than on the first request."""
    if numba is not None:
        resize_many(Image.new("RGB", (64, 48)), [(20, 30), (64, 20)])
