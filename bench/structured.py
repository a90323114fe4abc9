"""The cost of structured outputs: tokens/s of N concurrent streams constrained by a JSON schema
against the same load unconstrained, alternating rounds on one server, median of the paired ratios.

    python -m bench.structured --concurrency 16 --rounds 7

The schema keeps the answer inside one long string (minLength), so both loads generate max_tokens
tokens per stream (the constrained ones end by length, like the unconstrained ones with ignore_eos).
Prints a table and saves it (and a plot) under --out."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

import httpx

from tests.live import ROOT, start_server_process, stop_process

SCHEMA = {"type": "object", "properties": {"story": {"type": "string", "minLength": 4000}}, "required": ["story"],
          "additionalProperties": False}


async def _one(c: httpx.AsyncClient, url: str, name: str, max_tokens: int, constrained: bool, i: int) -> int:
    body = {"model": name, "messages": [{"role": "user", "content": f"Tell story {i}."}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    if constrained:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}}
    tokens = 0
    async with c.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if line.startswith("data: {") and '"usage"' in line:
                usage = json.loads(line[6:]).get("usage")
                tokens = usage["completion_tokens"] if usage else tokens
    return tokens


async def _load(url: str, name: str, n: int, max_tokens: int, constrained: bool) -> float:
    async with httpx.AsyncClient(timeout=600) as c:
        t0 = time.perf_counter()
        counts = await asyncio.gather(*(_one(c, url, name, max_tokens, constrained, i) for i in range(n)))
        return sum(counts) / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: the tiny one under .cache/)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--server-args", default="")
    ap.add_argument("--out", default=str(ROOT / "artifacts" / "bench"))
    args = ap.parse_args(argv)
    from server.engine.build import resolve_model_dir

    model = resolve_model_dir(args.model, ROOT / ".cache")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # the server as `make run` runs it: torch's default threads
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    proc, url = start_server_process(model, *args.server_args.split(), timeout=300, env=env)
    try:
        name = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        asyncio.run(_load(url, name, 2, 8, True))  # warm: the schema is compiled once, then cached
        plain, constrained, ratios = [], [], []
        for r in range(args.rounds):
            order = [False, True] if r % 2 == 0 else [True, False]
            got = {c: asyncio.run(_load(url, name, args.concurrency, args.max_tokens, c)) for c in order}
            plain.append(got[False])
            constrained.append(got[True])
            ratios.append(got[True] / got[False])
    finally:
        stop_process(proc)
    table = "\n".join([
        f"# structured outputs: {args.concurrency} streams x {args.max_tokens} tokens, {args.rounds} alternating "
        f"rounds, {model.name}", "",
        "| load | tokens/s (median) |", "|---|---|",
        f"| unconstrained | {statistics.median(plain):.0f} |",
        f"| JSON schema | {statistics.median(constrained):.0f} |",
        f"| ratio (median of paired rounds) | x{statistics.median(ratios):.3f} |"])
    print(table)
    (out / "structured.md").write_text(table + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(4, 3))
        ax.bar(["unconstrained", "JSON schema"], [statistics.median(plain), statistics.median(constrained)])
        ax.set_ylabel("tokens/s")
        fig.tight_layout()
        fig.savefig(out / "structured.png")
    except ImportError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
