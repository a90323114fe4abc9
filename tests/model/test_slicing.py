import math

import numpy as np
import pytest
from PIL import Image

from model.slicing import (CLIP_MEAN, CLIP_STD, choose_grid, count_image_tokens, normalise_views, preprocess,
                           resized_size, slice_image)


@pytest.mark.parametrize("size,grid", [
    ((1, 1), (1, 2)), ((90, 60), (1, 2)), ((336, 336), (1, 2)), ((500, 1500), (1, 5)), ((4000, 300), (7, 1)),
    ((1000, 700), (3, 2)), ((10000, 10000), (2, 3)), ((672, 336), (2, 1)), ((336, 1008), (1, 3)),
])
def test_grid_choice(size, grid):
    assert choose_grid(*size) == grid


def _brute_force_grid(w, h, s=336):
    """Straight from the spec, written independently of the module."""
    n = min(6, math.ceil(w * h / s / s))
    n = 2 if n == 1 else n
    ms = [n, n + 1] if n <= 2 else [n - 1, n, n + 1]
    best, key = None, None
    for m in ms:
        for c in range(1, m + 1):
            if m % c:
                continue
            r = m // c
            f = min(c * s / w, r * s / h)
            eff = min(int(w * f) * int(h * f), w * h)
            k = (eff, -(c * s * r * s - eff))
            if key is None or k > key:
                best, key = (c, r), k
    return best


def test_grid_choice_matches_spec_over_many_sizes():
    rng = np.random.default_rng(0)
    sizes = [(int(w), int(h)) for w, h in rng.integers(1, 5000, size=(400, 2))]
    sizes += [(w, h) for w in (1, 17, 336, 337, 672, 1344, 2016) for h in (1, 99, 336, 1008, 3000)]
    for w, h in sizes:
        assert choose_grid(w, h) == _brute_force_grid(w, h), (w, h)


def test_resize_keeps_float_order():
    # 1500 * (336 / 500) = 1008.0000000000001 -> ceil gives 1009, capped by the canvas
    assert resized_size(500, 1500, (336, 1680)) == (336, 1009)


def test_every_image_has_at_least_two_tiles():
    for w, h in [(1, 1), (10, 10), (336, 336), (300, 200)]:
        c, r = choose_grid(w, h)
        assert c * r >= 2


def test_slicing_pixels_match_direct_pil():
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, size=(700, 1000, 3), dtype=np.uint8))
    views, grid = slice_image(img)
    assert grid == (3, 2) and len(views) == 7
    # direct computation
    cols, rows = grid
    canvas = Image.new("RGB", (cols * 336, rows * 336))
    # sw = 1.008 >= sh = 0.96: the height fills the canvas
    nw, nh = min(math.ceil(1000 * (672 / 700)), 1008), 672
    canvas.paste(img.resize((nw, nh), Image.BICUBIC), ((1008 - nw) // 2, (672 - nh) // 2))
    arr = np.asarray(canvas)
    assert np.array_equal(np.asarray(views[0]), np.asarray(img.resize((336, 336), Image.BICUBIC)))
    for i, tile in enumerate(views[1:]):
        r, c = divmod(i, cols)
        assert np.array_equal(np.asarray(tile), arr[r * 336:(r + 1) * 336, c * 336:(c + 1) * 336])


def test_normalisation_equals_clip_arithmetic():
    rng = np.random.default_rng(2)
    tile = Image.fromarray(rng.integers(0, 256, size=(336, 336, 3), dtype=np.uint8))
    out = normalise_views([tile])[0]
    raw = np.asarray(tile).astype(np.float64) * (1 / 255)
    expect = (raw.astype(np.float32) - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    assert out.dtype == np.float32
    assert np.array_equal(out, expect.transpose(2, 0, 1))


def test_normalisation_equals_transformers_clip_processor():
    transformers = pytest.importorskip("transformers")
    proc = transformers.CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    rng = np.random.default_rng(3)
    tile = Image.fromarray(rng.integers(0, 256, size=(336, 336, 3), dtype=np.uint8))
    ref = np.asarray(proc(tile, return_tensors="np")["pixel_values"][0])
    assert np.allclose(normalise_views([tile])[0], ref, atol=1e-6)


def test_preprocess_shapes_and_counts():
    img = Image.new("RGB", (4000, 300), (10, 20, 30))
    pixels, grid = preprocess(img)
    count = count_image_tokens(4000, 300)
    assert pixels.shape == (count.num_views, 3, 336, 336) and grid == count.grid == (7, 1)
    assert count.local_tokens == 7 * 144 and count.global_tokens == 576
