"""Concurrency and throughput at a fixed KV-cache memory budget: the paged cache (this checkout)
against the slot design (a base commit, one `--max-model-len` slot per sequence), side by side.

    python -m bench.paged_kv --base 4bb5403 --kv-mb 8 --rounds 3

The base gets the slots that fit the budget (`--max-batch-size` = budget / (max-model-len x bytes a
position)); this checkout gets `--kv-cache-mb`. Two loads, in alternating rounds:

- images: N concurrent image requests (the two shared photos, a different question each), streamed,
  `max_tokens` each: tokens/s, the most requests running at once, TTFT p50;
- system prompt: one long system prompt (~2,900 positions), a first question (cold) then another
  (warm): time to first token, cold and warm (prefix reuse).

Prints a table, saves it with a plot under --out."""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

from bench.compare_commits import _start, base_tree, bench_model
from tests.live import ROOT, data_url, photo


def _metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


class _Peak(threading.Thread):
    def __init__(self, url: str, name: str):
        super().__init__(daemon=True)
        self.url, self.name, self.value, self.done = url, name, 0.0, threading.Event()

    def run(self):
        while not self.done.is_set():
            self.value = max(self.value, _metric(self.url, self.name))
            time.sleep(0.02)


async def _image_load(url: str, model: str, images: list[str], n: int, max_tokens: int) -> dict:
    async def one(c: httpx.AsyncClient, i: int) -> tuple[float, int]:
        body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
                "messages": [{"role": "user", "content": [
                    {"type": "text", "text": f"Question {i}: what is happening in this picture?"},
                    {"type": "image_url", "image_url": {"url": images[i % len(images)]}}]}]}
        t0, first, tokens = time.perf_counter(), None, 0
        async with c.stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"{url} answered {r.status_code}: {(await r.aread())[:300]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                choices = json.loads(line[6:]).get("choices") or [{}]
                if choices[0].get("delta", {}).get("content"):  # not the role chunk's empty content
                    tokens += 1
                    first = first or time.perf_counter() - t0
        return first or 0.0, tokens

    async with httpx.AsyncClient(timeout=600) as c:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(c, i) for i in range(n)))
        wall = time.perf_counter() - t0
    return {"tok_s": sum(t for _, t in results) / wall, "ttft_p50": statistics.median(f for f, _ in results),
            "wall": wall}


def _ttft(url: str, model: str, system: str, question: str) -> float:
    body = {"model": model, "max_tokens": 1,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}]}
    t0 = time.perf_counter()
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=300)
    if r.status_code != 200:
        raise RuntimeError(f"{url} answered {r.status_code}: {r.text[:300]}")
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="a commit with the slot design (this checkout is the other)")
    ap.add_argument("--model", default=None, help="checkpoint (default: a tiny one built under --out)")
    ap.add_argument("--kv-mb", type=int, default=8, help="the KV-cache budget both servers get")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "artifacts" / "bench"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    from model.config import SliMEConfig
    from model.images import load_image
    from model.kv_cache import KVCache

    model = bench_model(args.model, out)
    cfg = SliMEConfig.from_file(model)
    per_pos = KVCache.bytes_per_token(num_layers=cfg.num_hidden_layers, num_kv_heads=cfg.num_key_value_heads,
                                      head_dim=cfg.dim_head, dtype=torch.float32)  # the CPU serves float32
    slots = max(1, (args.kv_mb << 20) // (per_pos * args.max_model_len))
    sha, tree = base_tree(args.base)
    common = ["--max-model-len", str(args.max_model_len), "--max-waiting-requests", "256"]
    base_name, head_name = f"slots {sha} ({slots} x {args.max_model_len})", f"paged ({args.kv_mb} MiB)"
    servers = {base_name: _start(tree, model, [*common, "--max-batch-size", str(slots)]),
               head_name: _start(ROOT, model, [*common, "--kv-cache-mb", str(args.kv_mb)])}
    images = [data_url(load_image(photo(n))) for n in ("extreme_ironing.jpg", "waterview.jpg")]
    name = Path(model).name
    results: dict = {s: {"images": [], "peak": [], "cold": [], "warm": []} for s in servers}
    try:
        for _, url in servers.values():  # warm up: vision cache and lazy initialisation
            asyncio.run(_image_load(url, name, images, 2, 4))
        for r in range(args.rounds):
            order = list(servers) if r % 2 == 0 else list(reversed(servers))
            for s in order:
                url = servers[s][1]
                peak = _Peak(url, "slime_num_requests_running")
                peak.start()
                results[s]["images"].append(asyncio.run(_image_load(url, name, images, args.requests, args.max_tokens)))
                peak.done.set()
                peak.join()
                results[s]["peak"].append(peak.value)
                system = " ".join(f"policy {r}.{j} applies to every answer {s[:5]}" for j in range(150))
                results[s]["cold"].append(_ttft(url, name, system, "First question?"))
                results[s]["warm"].append(_ttft(url, name, system, "A different question?"))
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(30)

    def med(s, key, field=None):
        xs = results[s][key]
        return statistics.median(x[field] for x in xs) if field else statistics.median(xs)

    lines = [f"# KV budget {args.kv_mb} MiB, max-model-len {args.max_model_len}: {base_name} vs {head_name}; "
             f"{args.rounds} alternating rounds, medians", "",
             f"| server | {args.requests} image streams tok/s | most running at once | image TTFT p50 s | "
             "system prompt TTFT cold s | warm s | warm / cold |",
             "|---|---|---|---|---|---|---|"]
    summary = {}
    for s in servers:
        row = {"tok_s": med(s, "images", "tok_s"), "peak": med(s, "peak"), "ttft": med(s, "images", "ttft_p50"),
               "cold": med(s, "cold"), "warm": med(s, "warm")}
        summary[s] = row
        lines.append(f"| {s} | {row['tok_s']:.0f} | {row['peak']:.0f} | {row['ttft']:.2f} | {row['cold']:.3f} | "
                     f"{row['warm']:.3f} | x{row['warm'] / row['cold']:.2f} |")
    b, h = summary[base_name], summary[head_name]
    lines += ["", f"paged / slots: image tokens/s x{h['tok_s'] / b['tok_s']:.2f}, running at once "
                  f"x{h['peak'] / max(b['peak'], 1):.2f}, warm system-prompt TTFT x{h['warm'] / b['warm']:.2f}"]
    text = "\n".join(lines)
    print(text)
    (out / f"paged-kv-{sha}.md").write_text(text + "\n")
    (out / f"paged-kv-{sha}.json").write_text(json.dumps({"rounds": results, "summary": summary}, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(9, 3))
        for ax, key, label in zip(axes, ("tok_s", "peak", "warm"), ("image tokens/s", "running at once",
                                                                     "warm TTFT s")):
            ax.bar(range(2), [summary[s][key] for s in servers], color=["grey", "tab:blue"])
            ax.set_xticks(range(2), ["slots", "paged"])
            ax.set_title(label)
        fig.tight_layout()
        fig.savefig(out / f"paged-kv-{sha}.png")
    except ImportError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
