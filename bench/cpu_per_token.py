"""Server CPU time per streamed token, by thread: the event loop (HTTP, SSE) against the engine
thread (model steps, sampling, detokenisation) and the rest.

    OMP_NUM_THREADS=1 python -m bench.cpu_per_token [--model DIR] [--streams 16] [--tokens 400]

Thread CPU time (from /proc, Linux) is far less noisy than wall time on a shared machine, so it
shows what a change to the per-token path saves even when latencies swing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

from .common import ROOT, start_slime, tiny_or
from .sse_client import stream_events


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of `pid`."""
    out = {}
    tick = os.sysconf("SC_CLK_TCK")
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            fields = open(f"/proc/{pid}/task/{tid}/stat").read().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # thread ended
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / tick
    return out


async def _stream(url: str, model: str, i: int, tokens: int) -> None:
    body = {"model": model, "stream": True, "max_tokens": tokens, "ignore_eos": True, "temperature": 0,
            "messages": [{"role": "user", "content": f"Tell me a long story, number {i}."}]}
    async for _ in stream_events(url, "/v1/chat/completions", body):
        pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.cpu_per_token")
    ap.add_argument("--model", default=None, help="checkpoint (default: the tiny one, built under .cache/)")
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    if not Path("/proc/self/task").exists():
        print("needs Linux /proc")
        return 2
    model = tiny_or(args.model)
    server = start_slime(model, ROOT / "artifacts" / "cpu-per-token-server.log", "--max-batch-size",
                         str(args.streams))
    pid = server.proc.pid
    rows = []
    try:
        asyncio.run(_stream(server.url, model.name, 0, 8))  # warm-up
        for _ in range(args.rounds):
            before, t0 = thread_cpu(pid), time.perf_counter()

            async def burst():
                await asyncio.gather(*(_stream(server.url, model.name, i, args.tokens) for i in range(args.streams)))

            asyncio.run(burst())
            after, wall = thread_cpu(pid), time.perf_counter() - t0
            used = {tid: after[tid] - before.get(tid, 0.0) for tid in after}
            tokens = args.streams * args.tokens
            loop = used.pop(pid, 0.0)  # the main thread runs the event loop
            busiest = max(used, key=used.get) if used else None  # the engine thread
            engine = used.pop(busiest, 0.0) if busiest is not None else 0.0
            rows.append((tokens / wall, loop / tokens * 1e6, engine / tokens * 1e6, sum(used.values()) / tokens * 1e6))
    finally:
        server.stop()
    print(f"{args.streams} streams x {args.tokens} tokens, server CPU per token (us)")
    print("| round | tokens/s | event loop | engine thread | other threads |")
    print("|---|---|---|---|---|")
    for i, (tps, loop, engine, other) in enumerate(rows):
        print(f"| {i + 1} | {tps:.0f} | {loop:.1f} | {engine:.1f} | {other:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
