"""`model.pillow_bicubic` (the compiled Pillow-exact bicubic resize) against Pillow itself: every
pixel, every shape."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from model import pillow_bicubic
from model.pillow_bicubic import bicubic_weights, resize_many


def _pillow(img, size):
    return np.asarray(img.resize(size, Image.Resampling.BICUBIC))


def _random_image(rng, w, h):
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))


def test_the_compiled_kernels_are_in_use():
    assert pillow_bicubic.numba is not None  # else every test below only checks Pillow against itself


@pytest.mark.parametrize("parts", [1, 2, 3])
def test_resize_many_is_pillow_bit_for_bit(parts):
    rng = np.random.default_rng(parts)
    pool = ThreadPoolExecutor(2)
    shapes = [(1000, 700), (4032 // 3, 3024 // 3), (517, 333), (300, 200), (1, 1), (2, 900), (900, 2)]
    shapes += [tuple(int(x) for x in rng.integers(20, 1600, 2)) for _ in range(6)]
    for w, h in shapes:
        img = _random_image(rng, w, h)
        sizes = [(336, 336), (int(rng.integers(1, 1400)), int(rng.integers(1, 1400))),
                 (w, max(1, h // 3)), (max(1, w // 2), h), (w * 2 + 1, h + 7), (w, h)]
        for out, size in zip(resize_many(img, sizes, pool, parts), sizes):
            assert out.shape == (size[1], size[0], 3) and out.dtype == np.uint8
            assert np.array_equal(out, _pillow(img, size)), ((w, h), size, parts)


def test_extreme_values_clip_like_pillow():
    # A hard black/white edge makes the cubic's negative lobes overshoot below 0 and above 255.
    arr = np.zeros((64, 300, 3), np.uint8)
    arr[:, 150:] = 255
    arr[::2, ::7] = 255
    img = Image.fromarray(arr)
    for size in [(97, 31), (301, 64), (600, 130), (13, 5)]:
        assert np.array_equal(resize_many(img, [size])[0], _pillow(img, size)), size


def test_very_tall_images_keep_pillows_pass_order():
    # Pillow resamples these vertically first (from Python); the result must still be Pillow's.
    img = _random_image(np.random.default_rng(9), 20, 3000)
    for size in [(336, 336), (5, 5)]:
        assert np.array_equal(resize_many(img, [size])[0], _pillow(img, size))


def test_weights_sum_to_one_in_fixed_point():
    for n_in, n_out in [(4032, 896), (4032, 336), (20, 336), (7, 3)]:
        w = bicubic_weights(n_in, n_out)
        assert w.taps.shape[0] == n_out and (w.count >= 1).all()
        assert (w.first >= 0).all() and (w.first + w.count <= n_in).all()
        assert np.abs(w.taps.sum(1) - (1 << pillow_bicubic.PRECISION_BITS)).max() <= w.taps.shape[1]


def test_non_rgb_is_refused():
    with pytest.raises(ValueError, match="RGB"):
        resize_many(Image.new("L", (10, 10)), [(5, 5)])


def test_without_pillows_raw_encoder_the_public_conversion_gives_the_same_pixels(monkeypatch):
    img = _random_image(np.random.default_rng(4), 333, 251)
    sizes = [(336, 336), (120, 90)]
    fast = resize_many(img, sizes)
    monkeypatch.setattr(pillow_bicubic, "_rgbx_from_storage", lambda *args: None)
    for a, b, size in zip(resize_many(img, sizes), fast, sizes):
        assert np.array_equal(a, b) and np.array_equal(a, _pillow(img, size))
