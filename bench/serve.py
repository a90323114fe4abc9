"""Serving benchmark: throughput and latency against concurrency, side by side.

    OMP_NUM_THREADS=1 python -m bench.serve [--model DIR] [--concurrency 1,2,4,8,16,32]
        [--max-tokens 256] [--text-max-tokens 64] [--no-peer] [--out artifacts/bench]

Runs in one go, on one machine:
  1. streamed image+question requests (each its OWN distinct 1000 x 700 image) against our server
     at each concurrency, fixed output length (`ignore_eos`);
  2. the same against our server with `--max-batch-size 1` (a server without batching);
  3. text-only, 16 concurrent non-streamed greedy requests (max 64 tokens): our server and
     `transformers serve --continuous-batching` on the same LLM weights and prompt template.
Prints a table per part and saves a plot of throughput and latency against concurrency.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from .common import ROOT, Process, free_port, median, pct, start_command_process, start_slime, tiny_or
from .sse_client import stream_events

QUESTION = "What is unusual about this image?"


@dataclass
class Result:
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    tokens: int = 0
    requests: int = 0
    wall: float = 0.0
    image_tokens: list[int] = field(default_factory=list)

    def row(self, label: str) -> dict:
        return {"label": label, "tok_s": self.tokens / self.wall, "req_s": self.requests / self.wall,
                "ttft_p50": median(self.ttft), "ttft_p99": pct(self.ttft, 99), "itl_p50": median(self.itl),
                "itl_p99": pct(self.itl, 99),
                "image_tokens": float(np.mean(self.image_tokens)) if self.image_tokens else 0.0}


def distinct_image(i: int, size=(1000, 700)) -> str:
    """A different photo-like image per request (no cache can flatter the result)."""
    rng = np.random.default_rng(1000 + i)
    small = rng.integers(0, 256, size=(size[1] // 20, size[0] // 20, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize(size, Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


async def stream_one(url: str, body: dict, res: Result) -> None:
    t0 = time.perf_counter()
    last = None
    async for chunk in stream_events(url, "/v1/chat/completions", body):
        if chunk.get("usage"):
            res.tokens += chunk["usage"]["completion_tokens"]
            res.image_tokens.append(chunk["usage"]["prompt_tokens"])
        if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            now = time.perf_counter()
            if last is None:
                res.ttft.append(now - t0)
            else:
                res.itl.append(now - last)
            last = now
    res.requests += 1


async def run_level(url: str, model: str, concurrency: int, images: list[str], max_tokens: int) -> Result:
    res = Result()
    queue: asyncio.Queue = asyncio.Queue()
    for img in images:
        queue.put_nowait(img)

    async def worker():
        while not queue.empty():
            img = queue.get_nowait()
            body = {"model": model, "stream": True, "stream_options": {"include_usage": True}, "temperature": 0,
                    "max_tokens": max_tokens, "ignore_eos": True,
                    "messages": [{"role": "user", "content": [{"type": "text", "text": QUESTION},
                                                              {"type": "image_url", "image_url": {"url": img}}]}]}
            await stream_one(url, body, res)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    res.wall = time.perf_counter() - t0
    return res


async def run_text(url: str, model: str, concurrency: int, max_tokens: int, prompts: list[str],
                   extra: dict | None = None) -> Result:
    res = Result()

    async def one(client, prompt):
        body = {"model": model, "temperature": 0, "max_tokens": max_tokens,
                "messages": [{"role": "user", "content": prompt}], **(extra or {})}
        r = await client.post(url + "/v1/chat/completions", json=body)
        r.raise_for_status()
        res.tokens += r.json()["usage"]["completion_tokens"]
        res.requests += 1

    async with httpx.AsyncClient(timeout=600) as client:
        t0 = time.perf_counter()
        sem = asyncio.Semaphore(concurrency)

        async def guarded(p):
            async with sem:
                await one(client, p)

        await asyncio.gather(*(guarded(p) for p in prompts))
        res.wall = time.perf_counter() - t0
    return res


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n## {title}\n")
    print("| run | conc | out tok/s | req/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | prompt tok/req |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['label']} | {r.get('conc', '')} | {r['tok_s']:.1f} | {r['req_s']:.2f} | {r['ttft_p50'] * 1e3:.0f} | "
              f"{r['ttft_p99'] * 1e3:.0f} | {r['itl_p50'] * 1e3:.1f} | {r['itl_p99'] * 1e3:.1f} | "
              f"{r['image_tokens']:.0f} |")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for label in sorted({r["label"] for r in rows}):
        rs = [r for r in rows if r["label"] == label]
        xs = [r["conc"] for r in rs]
        a.plot(xs, [r["tok_s"] for r in rs], marker="o", label=label)
        b.plot(xs, [r["itl_p50"] * 1e3 for r in rs], marker="o", label=f"{label} ITL p50")
        b.plot(xs, [r["ttft_p50"] * 1e3 for r in rs], marker="x", linestyle="--", label=f"{label} TTFT p50")
    a.set(xscale="log", xlabel="concurrency", ylabel="output tokens/s", title="Throughput (image requests)")
    b.set(xscale="log", yscale="log", xlabel="concurrency", ylabel="ms", title="Latency")
    a.legend()
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def start_transformers_serve(llm_dir: Path, log: Path) -> Process:
    port = free_port()
    exe = Path(sys.executable).with_name("transformers")
    args = [str(exe), "serve", str(llm_dir), "--port", str(port), "--continuous-batching",
            "--cb-num-blocks", "64", "--cb-block-size", "32", "--cb-max-batch-tokens", "512"]
    return start_command_process(args, f"http://127.0.0.1:{port}", "/health", log)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: the tiny one, built under .cache/)")
    ap.add_argument("--concurrency", default="1,2,4,8,16,32")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--text-max-tokens", type=int, default=64)
    ap.add_argument("--server-args", default="", help="extra flags for every slime server (e.g. --engine-process)")
    ap.add_argument("--text-rounds", type=int, default=9, help="alternating rounds per server")
    ap.add_argument("--rounds", type=int, default=3, help="rounds over the concurrency levels")
    ap.add_argument("--requests-per-level", type=int, default=0, help="default: max(concurrency, 4)")
    ap.add_argument("--no-peer", action="store_true", help="skip transformers serve")
    ap.add_argument("--no-unbatched", action="store_true")
    ap.add_argument("--text-only", action="store_true", help="only the text-only side-by-side part")
    ap.add_argument("--image-only", action="store_true", help="skip the text-only side-by-side part")
    ap.add_argument("--out", default=str(ROOT / "artifacts" / "bench"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = tiny_or(args.model)
    name = model.name
    levels = [int(x) for x in args.concurrency.split(",")]
    rows: list[dict] = []
    image_id = 0
    summary: dict = {}
    runs = [] if args.text_only else [("slime (batched)", [])] + ([] if args.no_unbatched else [("slime --max-batch-size 1",
                                                                        ["--max-batch-size", "1"])])
    for label, extra in runs:
        server = start_slime(model, out / f"server-{len(rows)}.log", "--max-batch-size",
                             str(max(levels)) if not extra else "1", "--max-waiting-requests", "256",
                             *args.server_args.split())
        try:
            asyncio.run(run_level(server.url, name, 1, [distinct_image(999_999)], 8))  # warm-up
            # Levels are visited in rounds (1, 2, ..., 32, then again) so that a noisy phase of the
            # machine does not land on one level only; each level reports its median round.
            results: dict[int, list[Result]] = {c: [] for c in levels}
            for _ in range(args.rounds):
                for c in levels:
                    n = args.requests_per_level or max(c, 4)
                    images = [distinct_image(image_id + i) for i in range(n)]
                    image_id += n
                    results[c].append(asyncio.run(run_level(server.url, name, c, images, args.max_tokens)))
            if label == "slime (batched)" and 1 in results and 16 in results:
                # Paired per round (16 right after 1 in the same round), so a slow phase of the
                # machine shifts both sides of a ratio alike.
                pairs = list(zip(results[1], results[16]))
                summary["paired"] = {
                    "itl_p50_ratio": [median(b.itl) / median(a.itl) for a, b in pairs],
                    "tok_s_ratio": [(b.tokens / b.wall) / (a.tokens / a.wall) for a, b in pairs]}
            for c in levels:
                rs = sorted(results[c], key=lambda r: r.tokens / r.wall)
                merged = rs[len(rs) // 2]
                merged.ttft = [x for r in rs for x in r.ttft]
                merged.itl = [x for r in rs for x in r.itl]
                row = merged.row(label)
                row["conc"] = c
                row["rounds_tok_s"] = [round(r.tokens / r.wall, 1) for r in results[c]]
                rows.append(row)
                print(f"{label} c={c}: {row['tok_s']:.1f} tok/s, ITL p50 {row['itl_p50'] * 1e3:.1f} ms", flush=True)
        finally:
            server.stop()
    if rows:
        print_table("Streamed image requests (distinct 1000 x 700 images)", rows)
        plot(rows, out / "serve.png")
    summary["image"] = rows
    solo = next((r for r in rows if r["label"] == "slime (batched)" and r["conc"] == 1), None)
    at16 = next((r for r in rows if r["label"] == "slime (batched)" and r["conc"] == 16), None)
    if solo and at16:
        print(f"\nbatched c=16 vs c=1: throughput x{at16['tok_s'] / solo['tok_s']:.2f}, "
              f"ITL p50 ratio {at16['itl_p50'] / solo['itl_p50']:.2f} (median rounds)")
    if "paired" in summary:
        p = summary["paired"]
        print("paired per round: ITL p50 ratio " + ", ".join(f"{x:.2f}" for x in p["itl_p50_ratio"])
              + f" (median {median(p['itl_p50_ratio']):.2f}); throughput " + ", ".join(f"x{x:.2f}" for x in p["tok_s_ratio"])
              + f" (median x{median(p['tok_s_ratio']):.2f})")

    if args.image_only:
        (out / "serve.json").write_text(json.dumps(summary, indent=2))
        return 0
    # Text-only, side by side with transformers serve on the same LLM weights. Both servers stay
    # up and the rounds alternate between them, so a noisy phase of the machine hits both alike.
    prompts = [f"Describe picture number {i} in detail, please." for i in range(32)]
    servers = [("slime", start_slime(model, out / "server-text.log", "--max-batch-size", "16",
                                     "--max-waiting-requests", "64", *args.server_args.split()), name,
                {"ignore_eos": True})]
    try:
        if not args.no_peer:
            from weights.export_llm import export_llm

            llm_dir = export_llm(model, ROOT / ".cache" / f"{name}-llm")
            # transformers serve has no ignore_eos: tokens/s counts the tokens it really produced.
            servers.append(("transformers serve --continuous-batching",
                            start_transformers_serve(llm_dir, out / "transformers-serve.log"), str(llm_dir), {}))
        for _, srv, mid, extra in servers:
            asyncio.run(run_text(srv.url, mid, 16, 8, prompts, extra))  # warm-up
        per_round: dict[str, list[Result]] = {label: [] for label, *_ in servers}
        solo: dict[str, list[Result]] = {label: [] for label, *_ in servers}
        for _ in range(args.text_rounds):
            for label, srv, mid, extra in servers:
                per_round[label].append(asyncio.run(run_text(srv.url, mid, 16, args.text_max_tokens, prompts, extra)))
                solo[label].append(asyncio.run(run_text(srv.url, mid, 1, args.text_max_tokens, prompts[:2], extra)))
    finally:
        for _, srv, *_ in servers:
            srv.stop()
    text_rows = []
    for label, results in per_round.items():
        best = sorted(results, key=lambda r: r.tokens / r.wall)[len(results) // 2]  # the median round
        r = best.row(label)
        r["conc"] = 16
        r["rounds_tok_s"] = [round(x.tokens / x.wall, 1) for x in results]
        text_rows.append(r)
        one = sorted(solo[label], key=lambda x: x.tokens / x.wall)[len(solo[label]) // 2].row(label + " (one at a time)")
        one["conc"] = 1
        text_rows.append(one)
    print_table("Text-only, non-streamed greedy", text_rows)
    if len(text_rows) >= 3:
        ratios = [a / b for a, b in zip(text_rows[0]["rounds_tok_s"], text_rows[2]["rounds_tok_s"])]
        print(f"\nslime vs transformers serve at 16: x{text_rows[0]['tok_s'] / text_rows[2]['tok_s']:.2f} tokens/s "
              f"(median rounds); per round: {', '.join(f'x{x:.2f}' for x in ratios)} "
              f"(median of the paired rounds x{median(ratios):.2f})")
        summary["text_paired_ratios"] = ratios
    summary["text"] = text_rows
    (out / "serve.json").write_text(json.dumps(summary, indent=2))
    print(f"\nplot: {out / 'serve.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
