"""Image preprocessing: our slicing + table normalisation against the reference path (PIL resize
and crop per view, then `CLIPImageProcessor` per view), on a 4032 x 3024 photo.

    python -m bench.preprocess [--repeat 5]

Checks the pixels are bit-identical and prints both times and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
from PIL import Image


def reference_path(image: Image.Image) -> np.ndarray:
    """What the reference does: resize/pad/crop with PIL, then the CLIP processor per view."""
    from transformers import CLIPImageProcessor

    from model.slicing import VIEW_SIZE, choose_grid, resized_size

    proc = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    cols, rows = choose_grid(*image.size)
    tw, th = cols * VIEW_SIZE, rows * VIEW_SIZE
    nw, nh = resized_size(*image.size, (tw, th))
    canvas = Image.new("RGB", (tw, th))
    canvas.paste(image.resize((nw, nh), Image.BICUBIC), ((tw - nw) // 2, (th - nh) // 2))
    views = [image.resize((VIEW_SIZE, VIEW_SIZE), Image.BICUBIC)]
    views += [canvas.crop((c * 336, r * 336, (c + 1) * 336, (r + 1) * 336)) for r in range(rows) for c in range(cols)]
    return np.stack([proc(v, return_tensors="np")["pixel_values"][0] for v in views])


def photo(size=(4032, 3024)) -> Image.Image:
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, size=(size[1] // 16, size[0] // 16, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.BICUBIC)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.preprocess")
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--image", default=None, help="a photo to use instead of a synthetic 4032 x 3024 one")
    args = ap.parse_args(argv)
    from model.images import load_image
    from model.slicing import preprocess

    img = load_image(args.image) if args.image else photo()
    ours, grid = preprocess(img)
    ref = reference_path(img)
    identical = np.array_equal(ours, ref) and np.array_equal(preprocess(img, parallel=False)[0], ref)

    def one_thread(image):
        return preprocess(image, parallel=False)

    # Alternate the paths so that a noisy phase of the machine hits them alike.
    t_ours, t_ref, t_one = [], [], []
    for _ in range(args.repeat):
        for fn, times in ((preprocess, t_ours), (reference_path, t_ref), (one_thread, t_one)):
            t0 = time.perf_counter()
            fn(img)
            times.append(time.perf_counter() - t0)
    ratios = sorted(r / o for o, r in zip(t_ours, t_ref))
    ratios_one = sorted(r / o for o, r in zip(t_one, t_ref))
    print(f"image {img.size[0]} x {img.size[1]}, grid {grid}, views {ours.shape[0]}")
    print(f"| path | best of {args.repeat}, ms | median, ms |")
    print("|---|---|---|")
    print(f"| reference (PIL per view + CLIPImageProcessor) | {min(t_ref) * 1e3:.1f} | {statistics.median(t_ref) * 1e3:.1f} |")
    print(f"| slime-serve (model.slicing.preprocess) | {min(t_ours) * 1e3:.1f} | {statistics.median(t_ours) * 1e3:.1f} |")
    print(f"| slime-serve, one thread (parallel=False) | {min(t_one) * 1e3:.1f} | {statistics.median(t_one) * 1e3:.1f} |")
    print(f"speed-up x{min(t_ref) / min(t_ours):.2f} (best), median of paired runs x{statistics.median(ratios):.2f}; "
          f"one thread: x{statistics.median(ratios_one):.2f}; pixels bit-identical: {identical}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
