"""What co-running work does to a decode step: the batched decode forward (16 sequences of ~1,200
cached positions, as with image requests) alone, then while a second thread keeps the other core
busy with torch compute, with memory copies, or with pure Python (which also holds the GIL).

    OMP_NUM_THREADS=1 python -m bench.contention [--model DIR] [--batch 16] [--context 1200]

Explains why inter-token latency grows while new requests' images are encoded beside decoding on
a 2-core machine, and why the engine keeps Python work on other threads short.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time

import numpy as np
import torch

from .common import tiny_or


def _busy_torch(stop: threading.Event) -> None:
    a = torch.randn(512, 512)
    while not stop.is_set():
        a @ a


def _busy_memory(stop: threading.Event) -> None:
    src = np.ones(64 * 2**20 // 8)
    dst = np.empty_like(src)
    while not stop.is_set():
        np.copyto(dst, src)


def _busy_python(stop: threading.Event) -> None:
    while not stop.is_set():
        sum(range(1000))


def _busy_preprocess(lm):
    """What a request's prep thread does: decode a JPEG upload, slice, normalise, tokenise."""
    import base64
    import io

    from PIL import Image

    from model.processor import prepare_image

    from .serve import distinct_image

    raw = base64.b64decode(distinct_image(7).split(",", 1)[1])

    def run(stop: threading.Event) -> None:
        while not stop.is_set():
            prepare_image(Image.open(io.BytesIO(raw)).convert("RGB"), lm.cfg, "", lm.image_norm)
    return run


def _busy_vision(lm):
    """What the vision thread does: CLIP and both adapters for a 1000 x 700 image (7 views)."""
    from PIL import Image

    from model.processor import prepare_image

    img = Image.new("RGB", (1000, 700), (90, 140, 200))
    prepared = prepare_image(img, lm.cfg, "", lm.image_norm)
    pixels = torch.from_numpy(prepared.pixels)

    def run(stop: threading.Event) -> None:
        while not stop.is_set():
            lm.model.encode_images([pixels], [prepared.grid])
    return run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.contention")
    ap.add_argument("--model", default=None, help="checkpoint (default: the tiny one, built under .cache/)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=1200)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args(argv)
    from model.loading import load_model

    lm = load_model(tiny_or(args.model))
    llm = lm.model.llm
    cache = llm.new_cache(num_slots=args.batch, max_len=args.context + 64)
    cache.k.normal_()
    cache.v.normal_()
    embeds = torch.randn(args.batch, lm.cfg.hidden_size)
    positions = [args.context + i % 32 for i in range(args.batch)]

    def step_ms(n: int) -> float:
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            llm.logits(llm.decode(embeds, positions, cache))
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    step_ms(5)
    rows = []
    for name, fn in [("torch matmuls", _busy_torch), ("memory copies", _busy_memory),
                     ("pure Python (holds the GIL)", _busy_python), ("image preprocessing", _busy_preprocess(lm)),
                     ("vision encoding", _busy_vision(lm))]:
        # Alone right before each neighbour: the machine's slow phases hit both sides of a ratio.
        alone = step_ms(args.steps)
        stop = threading.Event()
        th = threading.Thread(target=fn, args=(stop,), daemon=True)
        th.start()
        time.sleep(0.2)
        # A GIL-holding neighbour makes every step wait for the interpreter: measure a few only.
        busy = step_ms(3 if fn is _busy_python else args.steps)
        stop.set()
        th.join()
        rows.append((name, alone, busy))
    print(f"decode step, batch {args.batch}, {args.context} cached positions, median ms")
    print("| second thread | alone | with it | x |")
    print("|---|---|---|---|")
    for name, alone, busy in rows:
        print(f"| {name} | {alone:.2f} | {busy:.2f} | {busy / alone:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
