"""Hostile and unusual images through the decoder and the preprocessing a request's image goes
through (`server.media.open_image` -> `model.processor.prepare_image`), and some through the server.

Every input ends as one of two things: a clean 400 (`invalid_image` / `image_too_large`), or an RGB
image whose pixels are finite. Nothing else is raised and nothing takes long."""

import base64
import io
import random
import struct
import time
import warnings
import zlib
from dataclasses import replace

import httpx
import numpy as np
import pytest
from PIL import Image

from model.config import SliMEConfig
from model.images import to_rgb
from model.processor import prepare_image
from server.errors import APIError
from server.media import MAX_IMAGE_SIDE, open_image
from server.settings import Settings
from tests.live import LiveServer, image_message

MAX_PIXELS = 64_000_000  # the default limit
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]  # Pillow on corrupt files: expected here


@pytest.fixture(scope="module")
def cfgs(tiny_dir):
    """SliME's anyres slicing (the tiny checkpoint's), and LLaVA-1.5's single views (pad, square)."""
    anyres = SliMEConfig.from_file(tiny_dir / "config.json")
    single = [replace(anyres, image_aspect_ratio=a, mm_resampler_type="identity") for a in ("pad", "square")]
    assert anyres.has_local_branch and not any(c.has_local_branch for c in single)
    return anyres, single


def decode(data: bytes, cfg, *, also=(), max_pixels: int = MAX_PIXELS):
    """-> the RGB image, or the APIError; fails the test on anything else."""
    try:
        img = open_image(data, max_pixels=max_pixels, param="p")
    except APIError as e:
        assert e.status == 400 and e.code in ("invalid_image", "image_too_large") and e.param == "p", e.body()
        return e
    assert img.mode == "RGB" and img.width >= 1 and img.height >= 1
    for c in (cfg, *also):
        prepared = prepare_image(img, c)
        assert prepared.pixels.dtype == np.float32 and np.isfinite(prepared.pixels).all()
        assert prepared.pixels.shape[1:] == (3, 336, 336)
    return img


def save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def pillow_reads(data: bytes) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            Image.open(io.BytesIO(data)).load()
        return True
    except Exception:  # noqa: BLE001
        return False


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(width: int, height: int, *, bit_depth: int = 8, color_type: int = 2, rows: bytes | None = None,
        extra: bytes = b"") -> bytes:
    """A PNG written by hand: any header, any pixel rows (default: random, filter 0)."""
    if rows is None:
        channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[color_type]
        row = (width * channels * bit_depth + 7) // 8
        rng = np.random.default_rng(width * 7 + height)
        rows = b"".join(b"\0" + rng.integers(0, 256, row, dtype=np.uint8).tobytes() for _ in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + extra + chunk(b"IDAT", zlib.compress(rows, 9))
            + chunk(b"IEND", b""))


def photo(w: int = 53, h: int = 37, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def in_mode(mode: str) -> Image.Image:
    base = photo()
    if mode.startswith("I;16"):
        arr = np.random.default_rng(1).integers(0, 65536, (37, 53)).astype(">u2" if mode == "I;16B" else "<u2")
        return Image.frombytes(mode, (53, 37), arr.tobytes())
    if mode in ("La", "RGBa"):
        return base.convert("RGBA").convert(mode)
    if mode == "PA":
        return base.convert("P").convert("PA")
    img = base.convert(mode)
    if mode == "P":
        img.info["transparency"] = 3
    return img


MODES = ["1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "I",
         "I;16", "I;16B", "I;16L", "F"]
FORMATS = ["PNG", "TIFF", "WEBP", "GIF", "BMP", "JPEG"]


# -- every mode, every format ----------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_to_rgb_takes_every_mode(mode):
    """"La" (premultiplied LA) raised ValueError: Pillow has no La -> RGB conversion."""
    out = to_rgb(in_mode(mode))
    assert out.mode == "RGB" and out.size == (53, 37)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", MODES)
def test_every_mode_in_every_format_decodes_or_is_refused(cfgs, mode):
    anyres, single = cfgs
    img = in_mode(mode)
    saved = 0
    for fmt in FORMATS:
        try:
            data = save(img, fmt)
        except (OSError, ValueError, KeyError, TypeError):
            continue  # Pillow cannot write this mode in this format
        saved += 1
        out = decode(data, anyres, also=single)
        if pillow_reads(data):  # what Pillow reads, we read (YCbCr TIFF: Pillow cannot read its own file)
            assert isinstance(out, Image.Image), (fmt, out.body())
            assert out.size == (53, 37)
    assert saved or mode in ("La", "RGBa", "HSV")


@pytest.mark.parametrize("bit_depth, color_type", [(16, 0), (16, 2), (16, 4), (16, 6), (8, 4), (1, 0), (2, 0),
                                                   (4, 0), (4, 3), (8, 3)])
def test_png_bit_depths_and_colour_types(cfgs, bit_depth, color_type):
    plte = chunk(b"PLTE", bytes(range(48))) if color_type == 3 else b""
    assert isinstance(decode(png(31, 17, bit_depth=bit_depth, color_type=color_type, extra=plte), cfgs[0]),
                      Image.Image)


def test_16_bit_greyscale_is_scaled_not_clipped():
    for mode, raw in (("I;16", struct.pack("<4H", 0, 257, 40000, 65535)),
                      ("I;16B", struct.pack(">4H", 0, 257, 40000, 65535))):
        out = to_rgb(Image.frombytes(mode, (4, 1), raw))
        assert [out.getpixel((x, 0))[0] for x in range(4)] == [0, 1, 156, 255]
    # 32-bit: values above 255 are read as 16-bit; out of range ends at 0 or 255
    wide = Image.fromarray(np.array([[-5, 0, 256, 65535, 65536, 2**31 - 1]], np.int32))
    assert [to_rgb(wide).getpixel((x, 0))[0] for x in range(6)] == [0, 0, 1, 255, 255, 255]
    narrow = Image.fromarray(np.array([[-5, 0, 7, 255]], np.int32))
    assert [to_rgb(narrow).getpixel((x, 0))[0] for x in range(4)] == [0, 0, 7, 255]


def test_16_bit_conversion_memory_is_bounded():
    """float64 arithmetic over a 64-megapixel 16-bit image peaked at 1.5 GB; a table needs ~0.3 GB."""
    import tracemalloc

    img = Image.frombytes("I;16", (4000, 4000), np.arange(16_000_000, dtype=np.uint16).tobytes())
    tracemalloc.start()
    try:
        to_rgb(img)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16_000_000 * 5, peak  # uint16 + uint8 copies, not 3 float64 ones (384 MB)


# -- frames, orientation ---------------------------------------------------------------------------
def test_animations_and_pages_give_their_first_frame(cfgs):
    colours = [(200, 0, 0), (0, 200, 0), (0, 0, 200)]
    frames = [Image.new("RGB", (40, 30), c) for c in colours]
    for fmt in ("GIF", "WEBP", "PNG", "TIFF"):
        data = save(frames[0], fmt, save_all=True, append_images=frames[1:], duration=40)
        out = decode(data, cfgs[0])
        assert isinstance(out, Image.Image) and out.size == (40, 30)
        r, g, b = out.getpixel((20, 15))
        assert r > 150 and g < 50 and b < 50, (fmt, (r, g, b))


def _gif_frames(n: int) -> bytes:
    head = b"GIF89a" + struct.pack("<HHBBB", 1, 1, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"
    frame = b"\x21\xf9\x04\x00\x00\x00\x00\x00\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"
    return head + frame * n + b"\x3b"


def _tiff_pages(n: int) -> bytes:
    """n chained 1 x 1 greyscale pages sharing one pixel."""
    entries = [(256, 1), (257, 1), (258, 8), (259, 1), (262, 1), (273, None), (277, 1), (278, 1), (279, 1)]
    size = 2 + 12 * len(entries) + 4
    pixel = 8 + size * n
    out = bytearray(b"II*\0" + struct.pack("<I", 8))
    for i in range(n):
        ifd = struct.pack("<H", len(entries))
        for tag, value in entries:
            ifd += struct.pack("<HHII", tag, 4, 1, pixel if value is None else value)
        out += ifd + struct.pack("<I", 8 + size * (i + 1) if i < n - 1 else 0)
    return bytes(out + b"\x80")


@pytest.mark.timeout(60)
def test_many_frames_or_pages_decode_fast(cfgs):
    """The first frame was found through `n_frames`, which walks every frame: 20 000 TIFF pages
    (2 MB) took ~13 s, 100 000 (11 MB) over two minutes (quadratic)."""
    for data in (_tiff_pages(20_000), _gif_frames(200_000)):
        t0 = time.perf_counter()
        assert isinstance(decode(data, cfgs[0]), Image.Image)
        assert time.perf_counter() - t0 < 2.0


def _exif(orientation_entry: bytes) -> bytes:
    return b"Exif\0\0II*\0" + struct.pack("<IH", 8, 1) + orientation_entry + struct.pack("<I", 0)


def test_exif_orientation_and_broken_exif(cfgs):
    base = photo(40, 30)
    for o in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = o
        for fmt in ("JPEG", "PNG", "WEBP"):
            out = decode(save(base, fmt, exif=exif), cfgs[0])
            assert out.size == ((30, 40) if o >= 5 else (40, 30)), (fmt, o)
    broken = [struct.pack("<HHI", 0x112, 2, 4) + b"abc\0",  # ASCII
              struct.pack("<HHII", 0x112, 3, 0, 0),  # no values
              struct.pack("<HHII", 0x112, 4, 1, 2**32 - 1),  # out of range
              struct.pack("<HHII", 0x112, 3, 100, 10**6),  # values past the end
              struct.pack("<HHII", 0x112, 99, 1, 6)]  # unknown type
    for entry in broken:
        for fmt in ("JPEG", "PNG", "WEBP"):
            assert isinstance(decode(save(base, fmt, exif=_exif(entry)), cfgs[0]), Image.Image)


# -- sizes -----------------------------------------------------------------------------------------
@pytest.mark.timeout(120)
@pytest.mark.parametrize("size", [(1, 1), (2, 1), (1, 2), (1, 4000), (4000, 1), (335, 1), (1, 337), (1, 20000),
                                  (20000, 1), (3000, 2000)])
def test_extreme_aspect_ratios(cfgs, size):
    for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"):
        try:
            data = save(Image.new("RGB", size, (10, 200, 30)), fmt)
        except (OSError, ValueError):
            continue  # WebP: at most 16383 a side
        t0 = time.perf_counter()
        out = decode(data, cfgs[0])
        assert isinstance(out, Image.Image) and out.size == size, fmt
        assert time.perf_counter() - t0 < 3.0, (fmt, size)


@pytest.mark.timeout(60)
def test_longest_side_is_limited():
    """A 4M x 1 strip (a 12 kB PNG, 4 megapixels: under the pixel limit) took ~12 s to resize and a
    64M x 1 one three minutes and GBs of filter taps: the side limit refuses them from the header."""
    for w, h in ((4_000_000, 1), (1, 4_000_000), (MAX_IMAGE_SIDE + 1, 1), (64_000_000, 1)):
        rows = (b"\0" + bytes(w)) * h if w < 10_000_000 else b""
        t0 = time.perf_counter()
        with pytest.raises(APIError) as e:
            open_image(png(w, h, color_type=0, rows=rows), max_pixels=MAX_PIXELS, param="p")
        assert e.value.status == 400 and e.value.code == "image_too_large"
        assert time.perf_counter() - t0 < 1.0


def test_longest_side_at_the_limit_is_fast(cfgs):
    data = png(MAX_IMAGE_SIDE, 1, color_type=0, rows=b"\0" + bytes(MAX_IMAGE_SIDE))
    t0 = time.perf_counter()
    assert isinstance(decode(data, cfgs[0]), Image.Image)
    assert time.perf_counter() - t0 < 3.0


def test_pixel_bombs_refused_from_the_header():
    for data in (png(40_000, 40_000, rows=b""), png(2**31 - 1, 2**31 - 1, rows=b""), png(2**31 - 1, 1, rows=b"")):
        t0 = time.perf_counter()
        with pytest.raises(APIError) as e:
            open_image(data, max_pixels=MAX_PIXELS, param="p")
        assert e.value.code == "image_too_large" and time.perf_counter() - t0 < 0.5
    # Pillow's own guard (twice Image.MAX_IMAGE_PIXELS) under a looser server limit
    with pytest.raises(APIError) as e:
        open_image(png(20_000, 10_000, rows=b""), max_pixels=10**12, param="p")
    assert e.value.code == "image_too_large"


def test_a_zlib_bomb_within_the_limits_decodes(cfgs):
    """8000 x 8000 of zeros: a 64 kB file, 64 megapixels (the limit) -- allowed, and bounded."""
    data = png(8000, 8000, color_type=0, rows=b"\0" * (8001 * 8000))
    assert len(data) < 100_000
    t0 = time.perf_counter()
    assert isinstance(decode(data, cfgs[0]), Image.Image)
    assert time.perf_counter() - t0 < 20


@pytest.mark.parametrize("data", [b"", b"\x89", b"\x89PNG\r\n\x1a\n", png(0, 0, rows=b""), png(0, 5, rows=b"\0" * 5),
                                  png(5, 0, rows=b""), png(64_000_000, 1, rows=b""),
                                  b"GIF89a", b"II*\0", b"BM" + bytes(60), b"RIFF\0\0\0\0WEBPVP8 ", b"\xff\xd8\xff"],
                         ids=lambda d: repr(d[:12]))
def test_empty_zero_sized_and_stub_files_are_invalid(cfgs, data):
    assert isinstance(decode(data, cfgs[0]), APIError)


def test_formats_we_do_not_take_are_invalid():
    img = photo(20, 10)
    for fmt in ("ICO", "PCX", "TGA", "PPM", "SGI", "IM", "DDS", "QOI"):
        try:
            data = save(img, fmt)
        except (OSError, ValueError, KeyError):
            continue
        with pytest.raises(APIError) as e:
            open_image(data, max_pixels=MAX_PIXELS, param="p")
        assert e.value.code == "invalid_image"


# -- TIFF compressions and tags --------------------------------------------------------------------
def _patch_tiff(data: bytes, tag: int, value: int) -> bytes:
    offset = struct.unpack("<I", data[4:8])[0]
    out = bytearray(data)
    for i in range(struct.unpack("<H", data[offset:offset + 2])[0]):
        e = offset + 2 + 12 * i
        t, kind = struct.unpack("<HH", data[e:e + 4])
        if t == tag:
            out[e + 8:e + 12] = struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)
            return bytes(out)
    raise KeyError(tag)


@pytest.mark.timeout(120)
def test_tiff_compressions_real_and_mislabelled(cfgs):
    base = photo(60, 40)
    for comp in ("raw", "tiff_lzw", "tiff_deflate", "tiff_adobe_deflate", "packbits", "jpeg", "lzma", "zstd"):
        for mode in ("RGB", "L"):
            try:
                data = save(base.convert(mode), "TIFF", compression=comp)
            except (OSError, ValueError, KeyError):
                continue  # not built into this libtiff
            assert isinstance(decode(data, cfgs[0]), Image.Image), comp
    for comp in ("group3", "group4", "tiff_ccitt"):
        assert isinstance(decode(save(base.convert("1"), "TIFF", compression=comp), cfgs[0]), Image.Image)
    # An uncompressed file that claims another compression, photometric, bit depth or sample count
    for mode in ("RGB", "1", "L", "CMYK"):
        raw = save(base.convert(mode), "TIFF")
        for tag, values in {259: [2, 3, 4, 5, 6, 7, 8, 32771, 32773, 32809, 32946, 34676, 34677, 34712, 34925,
                                  50000, 65535, 0],
                            262: [0, 1, 2, 3, 4, 5, 6, 8, 9, 10, 32844, 32845, 65535],
                            258: [0, 1, 2, 4, 12, 16, 32, 64, 65535], 277: [0, 2, 3, 4, 5, 255, 65535],
                            284: [0, 2, 3], 339: [0, 2, 3, 4, 5]}.items():
            for v in values:
                try:
                    data = _patch_tiff(raw, tag, v)
                except KeyError:
                    continue
                decode(data, cfgs[0])


# -- truncated and corrupted files -----------------------------------------------------------------
def _samples() -> dict[str, bytes]:
    img = photo(60, 40, seed=3)
    frames = [img, photo(60, 40, seed=4)]
    exif = Image.Exif()
    exif[0x0112] = 6
    return {"png": save(img, "PNG"), "jpeg": save(img, "JPEG"), "progressive": save(img, "JPEG", progressive=True),
            "gif": save(img, "GIF"), "bmp": save(img, "BMP"), "tiff": save(img, "TIFF"),
            "tiff-lzw": save(img, "TIFF", compression="tiff_lzw"), "tiff-jpeg": save(img, "TIFF", compression="jpeg"),
            "webp": save(img, "WEBP"), "webp-lossless": save(img, "WEBP", lossless=True),
            "png16": png(31, 17, bit_depth=16, color_type=6), "apng": save(img, "PNG", save_all=True,
                                                                           append_images=frames[1:]),
            "gif-anim": save(img, "GIF", save_all=True, append_images=frames[1:]),
            "jpeg-exif": save(img, "JPEG", exif=exif), "cmyk-jpeg": save(img.convert("CMYK"), "JPEG")}


@pytest.mark.timeout(240)
def test_truncated_and_corrupted_files(cfgs):
    rng = random.Random(7)
    outcomes = {"ok": 0, "refused": 0}
    for name, data in _samples().items():
        cases = [data[:rng.randrange(len(data))] for _ in range(25)]
        for _ in range(40):
            b = bytearray(data)
            for _ in range(rng.choice([1, 1, 2, 4, 16])):
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            cases.append(bytes(b))
        for _ in range(15):  # runs of 0x00 / 0xff / 0x7f / 0x80, the values that break length fields
            b = bytearray(data)
            k, n = rng.randrange(len(b)), rng.randrange(1, 9)
            b[k:k + n] = bytes([rng.choice([0, 255, 0x7F, 0x80])]) * n
            cases.append(bytes(b))
        for case in cases:
            t0 = time.perf_counter()
            try:
                out = decode(case, cfgs[0])
            except AssertionError as e:
                raise AssertionError(f"{name}: {case[:64]!r}...") from e
            outcomes["ok" if isinstance(out, Image.Image) else "refused"] += 1
            assert time.perf_counter() - t0 < 3.0, name
    assert outcomes["ok"] > 100 and outcomes["refused"] > 100, outcomes


# -- through the server ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small(tiny_dir):
    with LiveServer(Settings(model=str(tiny_dir), device="cpu", max_model_len=4096, max_image_pixels=64_000_000,
                             max_request_bytes=4_000_000)) as s:
        yield s


def _url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


@pytest.mark.timeout(240)
def test_through_the_server(small):
    img = photo(60, 40, seed=5)
    good = [save(img.convert("CMYK"), "JPEG"), png(31, 17, bit_depth=16, color_type=6), _gif_frames(3),
            save(img, "JPEG", exif=b"Exif\0\0II*\0\x08\0\0\0\x01\0\x12\x01\x03\0\x01\0\0\0\x06\0\0\0\0\0\0\0"),
            save(Image.new("RGB", (1, 4000)), "PNG"), save(Image.new("RGB", (4000, 1)), "PNG"),
            save(img.convert("I;16"), "TIFF"), save(img.convert("LAB"), "TIFF"), save(img.convert("P"), "BMP")]
    bad = [save(img, "PNG")[:200], b"", png(0, 0, rows=b""), png(4_000_000, 1, color_type=0, rows=b""),
           png(40_000, 40_000, rows=b""), _patch_tiff(save(img, "TIFF"), 259, 32809), save(img, "ICO")]
    with httpx.Client(base_url=small.url, timeout=120) as http:
        for data in good:
            r = http.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 1,
                                                        "messages": [image_message("x", _url(data))]})
            assert r.status_code == 200, r.text
        for data in bad:
            t0 = time.perf_counter()
            r = http.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 1,
                                                        "messages": [image_message("x", _url(data))]})
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"}
            assert err["code"] in ("invalid_image", "image_too_large")
            assert err["param"] == "messages[0].content[1].image_url.url"
            assert time.perf_counter() - t0 < 5.0
        t0 = time.perf_counter()
        r = http.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 1,
                                                    "messages": [image_message("x", _url(_tiff_pages(20_000)))]})
        assert r.status_code == 200, r.text
        assert time.perf_counter() - t0 < 5.0
        assert http.get("/health").status_code == 200
