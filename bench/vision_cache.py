"""Vision-feature cache: time to first token for a repeated 2016 x 1344 image.

    python -m bench.vision_cache [--model DIR] [--repeat 5]

The first request decodes, slices and encodes the image; a repeat (a multi-turn chat resends
it every turn, with a new question) skips all of that and only reruns selection.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import sys
import time

import httpx
import numpy as np
from PIL import Image

from .common import ROOT, median, start_slime, tiny_or


def image_url(seed: int) -> str:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (84, 126, 3), dtype=np.uint8)).resize((2016, 1344), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=92)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


async def ttft(url: str, model: str, img: str, question: str) -> float:
    body = {"model": model, "stream": True, "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "user", "content": [{"type": "text", "text": question},
                                                      {"type": "image_url", "image_url": {"url": img}}]}]}
    async with httpx.AsyncClient(timeout=300) as c:
        t0 = time.perf_counter()
        async with c.stream("POST", url + "/v1/chat/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: ") and '"content": "' in line and '"content": ""' not in line:
                    return time.perf_counter() - t0
                if line.startswith("data: ") and line != "data: [DONE]" and json.loads(line[6:]).get("error"):
                    raise RuntimeError(line)
    raise RuntimeError("no token")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.vision_cache")
    ap.add_argument("--model", default=None)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    model = tiny_or(args.model)
    out = ROOT / "artifacts" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    server = start_slime(model, out / "server-vision-cache.log")
    try:
        asyncio.run(ttft(server.url, model.name, image_url(0), "warm up"))
        first, repeat = [], []
        for i in range(args.repeat):
            img = image_url(100 + i)
            first.append(asyncio.run(ttft(server.url, model.name, img, "What is in this image?")))
            repeat.append(asyncio.run(ttft(server.url, model.name, img, "And what colour is the sky?")))
    finally:
        server.stop()
    f, r = median(first), median(repeat)
    print("| request | TTFT p50 ms |")
    print("|---|---|")
    print(f"| first sight of a 2016 x 1344 image | {f * 1e3:.0f} |")
    print(f"| same image, new question (cache hit) | {r * 1e3:.0f} |")
    print(f"repeat / first = {r / f:.2f} (target <= 0.40)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
