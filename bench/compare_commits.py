"""Two commits of this server side by side: the same streamed load on each, alternating rounds,
medians and the ratio (for refactors: does the engine's per-step overhead change?).

    python -m bench.compare_commits --base 74f8069 --rounds 5

The base commit runs from a git worktree under /tmp with this checkout's virtual environment.
Prints a table and saves it (and a plot) under --out."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.live import ROOT, free_port, wait_for


def _start(cwd: Path, model: str, extra: list[str]) -> tuple[subprocess.Popen, str]:
    """`python -m server` from the tree at `cwd` (its own code first on the path)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "server", "--model", model, "--port", str(port), "--device", "cpu",
                             "--log-level", "warning", *extra], cwd=cwd, env={**os.environ, "PYTHONPATH": str(cwd)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(url, timeout=180, proc=proc)
    except BaseException:
        proc.kill()
        raise
    return proc, url


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` and its children (an engine process) so far: unlike
    wall time, what another tenant of the machine takes does not count."""
    import psutil

    procs = [psutil.Process(pid)]
    procs += procs[0].children(recursive=True)
    return sum(t.user + t.system for t in (p.cpu_times() for p in procs))


def _measured(proc: subprocess.Popen, url: str, concurrency: int, max_tokens: int) -> tuple[float, ...]:
    """`_load`'s figures and the server's CPU milliseconds per token over the load."""
    cpu = _cpu_seconds(proc.pid)
    tps, itl, ttft, tokens = asyncio.run(_load(url, concurrency, max_tokens))
    return tps, itl, ttft, 1000 * (_cpu_seconds(proc.pid) - cpu) / tokens


def bench_model(model: str | None, out: Path) -> str:
    """`model` resolved, or a tiny checkpoint built once under `out`."""
    if model:
        return str(Path(model).resolve())
    from weights.make_tiny import make_tiny

    path = (out / "tiny").resolve()
    if not (path / "config.json").exists():
        make_tiny(path)
    return str(path)


def base_tree(commit: str) -> tuple[str, Path]:
    """(short sha, a git worktree of `commit` under /tmp), made once."""
    sha = subprocess.run(["git", "rev-parse", "--short", commit], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    tree = Path(f"/tmp/slime-base-{sha}")
    if not tree.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), sha], cwd=ROOT, check=True,
                       capture_output=True)
    return sha, tree


def _has_text(line: str) -> bool:
    """A chunk that carries text (an empty role-only chunk, which older builds sent first, is none)."""
    if not line.startswith("data: {"):
        return False
    choices = json.loads(line[6:]).get("choices") or [{}]
    return bool(choices[0].get("delta", {}).get("content"))


async def _one(c: httpx.AsyncClient, url: str, name: str, max_tokens: int, i: int) -> tuple[int, float, list[float]]:
    """-> (text chunks, time to the first in s, the gaps between them in s)."""
    body = {"model": name, "messages": [{"role": "user", "content": f"Tell me story number {i}."}],
            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    t0 = time.perf_counter()
    times = []
    async with c.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url} answered {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if _has_text(line):
                times.append(time.perf_counter())
    return len(times), times[0] - t0, [b - a for a, b in zip(times, times[1:])]


async def _load(url: str, concurrency: int, max_tokens: int) -> tuple[float, float, float, int]:
    """-> (tokens/s over the whole load, median inter-token gap in ms, median time to first token in
    ms, tokens)."""
    async with httpx.AsyncClient(timeout=300) as c:
        name = (await c.get(url + "/v1/models")).json()["data"][0]["id"]
        t0 = time.perf_counter()
        results = await asyncio.gather(*(_one(c, url, name, max_tokens, i) for i in range(concurrency)))
        wall = time.perf_counter() - t0
    gaps = [g for _, _, gs in results for g in gs]
    tokens = sum(n for n, _, _ in results)
    return tokens / wall, 1000 * statistics.median(gaps), 1000 * statistics.median(t for _, t, _ in results), tokens


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="the commit to compare against (this checkout is the other)")
    ap.add_argument("--model", default=None, help="checkpoint (default: a tiny one built under --out)")
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--server-args", default="")
    ap.add_argument("--out", default=str(ROOT / "artifacts" / "bench"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = bench_model(args.model, out)
    sha, tree = base_tree(args.base)
    extra = args.server_args.split()
    levels = [int(x) for x in args.concurrency.split(",")]
    servers = {f"base {sha}": _start(tree, model, extra), "this checkout": _start(ROOT, model, extra)}
    results: dict = {(name, c): [] for name in servers for c in levels}
    try:
        for _, url in servers.values():  # warm both
            asyncio.run(_load(url, 2, 8))
        for r in range(args.rounds):
            order = list(servers) if r % 2 == 0 else list(reversed(servers))
            for name in order:
                for c in levels:
                    results[(name, c)].append(_measured(*servers[name], c, args.max_tokens))
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(30)
    base, head = list(servers)
    lines = [f"# {head} vs {base}: {args.rounds} alternating rounds, {args.max_tokens} tokens per stream, "
             f"median per round", "",
             "| streams | base tok/s | this tok/s | ratio | paired ratio | base ITL p50 ms | this ITL p50 ms | ratio "
             "| base TTFT p50 ms | this TTFT p50 ms | ratio | base CPU ms/token | this CPU ms/token | ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    summary = {}
    for c in levels:
        bt = statistics.median(x[0] for x in results[(base, c)])
        ht = statistics.median(x[0] for x in results[(head, c)])
        bi = statistics.median(x[1] for x in results[(base, c)])
        hi = statistics.median(x[1] for x in results[(head, c)])
        bf = statistics.median(x[2] for x in results[(base, c)])
        hf = statistics.median(x[2] for x in results[(head, c)])
        bc = statistics.median(x[3] for x in results[(base, c)])
        hc = statistics.median(x[3] for x in results[(head, c)])
        # the median of each round's ratio: both servers measured in the same round, minutes apart at most
        paired = statistics.median(h[0] / b[0] for h, b in zip(results[(head, c)], results[(base, c)]))
        summary[c] = {"base_tps": bt, "head_tps": ht, "paired_ratio": paired, "base_itl_ms": bi, "head_itl_ms": hi,
                      "base_ttft_ms": bf, "head_ttft_ms": hf, "base_cpu_ms_per_token": bc, "head_cpu_ms_per_token": hc}
        lines.append(f"| {c} | {bt:.0f} | {ht:.0f} | x{ht / bt:.2f} | x{paired:.2f} | {bi:.2f} | {hi:.2f} | "
                     f"x{hi / bi:.2f} | {bf:.1f} | {hf:.1f} | x{hf / bf:.2f} | {bc:.2f} | {hc:.2f} | x{hc / bc:.2f} |")
    text = "\n".join(lines)
    print(text)
    (out / f"compare-{sha}.md").write_text(text + "\n")
    (out / f"compare-{sha}.json").write_text(json.dumps({"rounds": {f"{k[0]}|{k[1]}": v for k, v in results.items()},
                                                         "summary": summary}, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3))
        xs = range(len(levels))
        ax.bar([x - 0.2 for x in xs], [summary[c]["base_tps"] for c in levels], 0.4, label=base)
        ax.bar([x + 0.2 for x in xs], [summary[c]["head_tps"] for c in levels], 0.4, label=head)
        ax.set_xticks(list(xs), [f"{c} streams" for c in levels])
        ax.set_ylabel("tokens/s")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"compare-{sha}.png")
    except ImportError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
