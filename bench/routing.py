"""Replicas behind a cache-aware gateway (vllm-router) against nginx least-connections, same run.

    python -m bench.routing [--model DIR] [--replicas 3] [--conversations 6] [--turns 4]
                            [--fronts cache_aware,sticky,nginx]

Fronts: `cache_aware` (the gateway's prefix-tree policy, no session id), `sticky` (the gateway's
sticky_least_loaded policy, each conversation sending an `x-session-id` header) and `nginx`.

Each front gets fresh replicas (empty caches) and the same workload: concurrent multi-turn image
conversations, every turn resending the whole history (the image in the first user message, as
chat clients do) behind one long system prompt shared by all. Reported per front: the follow-up
turns' vision-cache hit rate and prefix-cache hit tokens summed over the replicas (from their
/metrics), the follow-ups' median time to first token, and output tokens/s. Prints a table and
saves a plot under artifacts/bench/.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import re
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from .common import ROOT, Process, free_port, median, start_slime, tiny_or
from .sse_client import stream_events

ENTRYPOINT = ROOT / "docker" / "router" / "entrypoint.sh"
# Gateway fronts: extra router flags (the entrypoint's default policy is cache_aware).
POLICIES = {"cache_aware": (), "sticky": ("--policy", "sticky_least_loaded")}


def gateway_binary() -> str:
    """vllm-router from PyPI (`pip install -e .[deploy]`), next to this interpreter or on PATH."""
    beside = Path(sys.executable).with_name("vllm-router")
    found = str(beside) if beside.exists() else shutil.which("vllm-router")
    if not found:
        raise FileNotFoundError("vllm-router not found: pip install vllm-router (the [deploy] extra)")
    return found


def start_gateway(workers: list[str], log: Path, *extra: str) -> Process:
    """The gateway as the images start it: docker/router/entrypoint.sh, on loopback ports."""
    port = free_port()
    env = {**os.environ, "PATH": f"{Path(gateway_binary()).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "SLIME_GATEWAY_WORKERS": " ".join(workers), "SLIME_GATEWAY_HOST": "127.0.0.1",
           "SLIME_GATEWAY_PORT": str(port), "SLIME_GATEWAY_METRICS_PORT": str(free_port())}
    return _start(["sh", str(ENTRYPOINT), *extra], f"http://127.0.0.1:{port}", "/v1/models", log, env)


def nginx_config(conf: str, ports: list[int], listen: int, workdir: Path) -> str:
    """docker/nginx/nginx.conf with its upstream pointed at 127.0.0.1 ports, runnable unprivileged."""
    servers = "".join(f"        server 127.0.0.1:{p} max_fails=3 fail_timeout=15s;\n" for p in ports)
    conf, n = re.subn(r"        server slime-replica:8000[^\n]*\n", servers, conf)
    if n != 1:
        raise ValueError("docker/nginx/nginx.conf: the upstream server line moved")
    conf = re.sub(r"    resolver [^\n]*\n", "", conf)
    conf = conf.replace("listen 8000;", f"listen 127.0.0.1:{listen};")
    return conf.replace("worker_processes auto;", f"worker_processes 1;\npid {workdir}/nginx.pid;\n"
                                                   f"error_log {workdir}/error.log;")


def start_nginx(ports: list[int], workdir: Path, log: Path) -> Process:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    listen = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "nginx.conf"
    conf.write_text(nginx_config((ROOT / "docker/nginx/nginx.conf").read_text(), ports, listen, workdir))
    args = [nginx, "-c", str(conf), "-p", str(workdir), "-g", "daemon off;"]
    return _start(args, f"http://127.0.0.1:{listen}", "/lb-health", log)


def _start(args: list[str], url: str, path: str, log: Path, env: dict[str, str] | None = None) -> Process:
    from tests.live import start_command

    return Process(start_command(args, url, path, timeout=60, log=log, env=env), url)


def conversation_image(seed: int, size=(672, 672)) -> str:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def system_prompt(chars: int) -> str:
    words = "You are a careful assistant for a photo archive. Describe what you see, name objects, " \
            "read any text, and answer the question asked, briefly and exactly. "
    return (words * (chars // len(words) + 1))[:chars]


@dataclass
class Turn:
    conversation: int
    turn: int
    ttft: float = float("nan")
    tokens: int = 0
    error: str = ""


@dataclass
class FrontResult:
    front: str
    turns: list[Turn] = field(default_factory=list)
    wall: float = 0.0
    vision_hits: float = 0.0
    vision_misses: float = 0.0
    prefix_hit_tokens: float = 0.0
    prefix_queried_tokens: float = 0.0
    per_replica_requests: list[float] = field(default_factory=list)

    @property
    def follow_ups(self) -> list[Turn]:
        return [t for t in self.turns if t.turn > 0 and not t.error]

    @property
    def follow_up_hit_rate(self) -> float:
        """Vision-cache hits over follow-up turns: every first turn is a miss (a new image)."""
        follow = sum(1 for t in self.turns if t.turn > 0)
        return self.vision_hits / follow if follow else float("nan")

    @property
    def follow_up_ttft(self) -> float:
        return median([t.ttft for t in self.follow_ups])

    @property
    def tok_s(self) -> float:
        return sum(t.tokens for t in self.turns) / self.wall if self.wall else float("nan")

    @property
    def errors(self) -> int:
        return sum(1 for t in self.turns if t.error)


async def one_turn(url: str, model: str, messages: list[dict], max_tokens: int, turn: Turn,
                   session: str | None = None) -> str:
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    headers = {"x-session-id": session} if session else None
    t0 = time.perf_counter()
    text = []
    try:
        async for event in stream_events(url, "/v1/chat/completions", body, headers):
            if event.get("error"):
                raise RuntimeError(event["error"].get("message", "error"))
            for choice in event.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    if not text:
                        turn.ttft = time.perf_counter() - t0
                    text.append(piece)
            if event.get("usage"):
                turn.tokens = event["usage"]["completion_tokens"]
    except Exception as e:  # a failed turn is counted, not fatal: the failover run expects some
        turn.error = f"{type(e).__name__}: {e}"[:200]
    return "".join(text)


async def conversation(url: str, model: str, c: int, turns: int, system: str, max_tokens: int,
                       out: list[Turn], session: bool = False) -> None:
    """Users arrive at different times and read each answer before asking again (seeded per
    conversation): in lockstep, least-connections would hand each conversation the same replica
    every round by accident of order."""
    pause = np.random.default_rng(1000 + c)
    await asyncio.sleep(pause.uniform(0, 1.0))
    image = conversation_image(c)
    messages = [{"role": "system", "content": system},
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                             {"type": "text", "text": f"Conversation {c}: what is in this image?"}]}]
    for t in range(turns):
        turn = Turn(c, t)
        out.append(turn)
        answer = await one_turn(url, model, messages, max_tokens, turn, f"conversation-{c}" if session else None)
        messages += [{"role": "assistant", "content": answer or "(no answer)"},
                     {"role": "user", "content": f"Turn {t + 1}: and what colour dominates on the left?"}]
        await asyncio.sleep(pause.uniform(0.1, 0.8))


def counter(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def replica_counters(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    return {"vision_hits": counter(text, "slime_vision_cache_total", '{result="hit"}'),
            "vision_misses": counter(text, "slime_vision_cache_total", '{result="miss"}'),
            "prefix_hit_tokens": counter(text, "slime_prefix_cache_hit_tokens_total"),
            "prefix_queried_tokens": counter(text, "slime_prefix_cache_queried_tokens_total"),
            "requests": sum(float(v) for v in re.findall(r"^slime_requests_total\{[^}]*\} (\S+)$", text, re.M))}


def run_front(front: str, url: str, replicas: list[str], model: str, *, conversations: int, turns: int,
              system_chars: int, max_tokens: int, first_image: int = 0, session: bool = False) -> FrontResult:
    """The workload through `url`; cache counters are this run's deltas, summed over `replicas`.
    Conversation c shows image `first_image + c` (a later run on warm replicas passes new ones);
    with `session` each conversation sends its own `x-session-id` header."""
    res = FrontResult(front)
    system = system_prompt(system_chars)
    before = [replica_counters(r) for r in replicas]

    async def run() -> None:
        await asyncio.gather(*(conversation(url, model, first_image + c, turns, system, max_tokens, res.turns, session)
                               for c in range(conversations)))

    t0 = time.perf_counter()
    asyncio.run(run())
    res.wall = time.perf_counter() - t0
    for r, b in zip(replicas, before):
        delta = {k: v - b[k] for k, v in replica_counters(r).items()}
        res.vision_hits += delta["vision_hits"]
        res.vision_misses += delta["vision_misses"]
        res.prefix_hit_tokens += delta["prefix_hit_tokens"]
        res.prefix_queried_tokens += delta["prefix_queried_tokens"]
        res.per_replica_requests.append(delta["requests"])
    return res


def start_replicas(model: Path, n: int, out: Path, tag: str) -> list[Process]:
    procs = []
    try:
        for i in range(n):
            procs.append(start_slime(model, out / f"routing-{tag}-replica{i}.log"))
    except BaseException:
        for p in procs:
            p.stop()
        raise
    return procs


def measure(front: str, model: Path, args, out: Path) -> FrontResult:
    replicas = start_replicas(model, args.replicas, out, front)
    urls = [p.url for p in replicas]
    lb = None
    try:
        if front == "nginx":
            lb = start_nginx([int(u.rsplit(":", 1)[1]) for u in urls], out / "nginx", out / "routing-nginx.log")
        else:
            lb = start_gateway(urls, out / f"routing-{front}.log", *POLICIES[front])
        return run_front(front, lb.url, urls, model.name, conversations=args.conversations, turns=args.turns,
                         system_chars=args.system_chars, max_tokens=args.max_tokens, session=front == "sticky")
    finally:
        for p in [lb, *replicas]:
            if p is not None:
                p.stop()


def print_table(rows: list[FrontResult], args) -> None:
    print(f"\n## Routing: {args.replicas} replicas, {args.conversations} conversations x {args.turns} turns, "
          f"{args.system_chars}-char shared system prompt\n")
    print("| front | follow-up vision-cache hits | prefix-cache hit tokens (sum) | follow-up TTFT p50 ms "
          "| out tok/s | requests per replica | errors |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.front} | {r.follow_up_hit_rate:.0%} | {r.prefix_hit_tokens:.0f} / "
              f"{r.prefix_queried_tokens:.0f} | {r.follow_up_ttft * 1e3:.0f} | {r.tok_s:.1f} | "
              f"{'/'.join(f'{x:.0f}' for x in r.per_replica_requests)} | {r.errors} |")


def plot(rows: list[FrontResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    names = [r.front for r in rows]
    for ax, values, title in zip(axes, [[r.follow_up_hit_rate * 100 for r in rows],
                                        [r.follow_up_ttft * 1e3 for r in rows], [r.tok_s for r in rows]],
                                 ["follow-up vision-cache hits (%)", "follow-up TTFT p50 (ms)", "output tokens/s"]):
        ax.bar(names, values, color=["tab:blue", "tab:green", "tab:orange"][:len(rows)])
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.routing")
    ap.add_argument("--model", default=None)
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--conversations", type=int, default=6)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--system-chars", type=int, default=2000)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--fronts", default="cache_aware,sticky,nginx")
    args = ap.parse_args(argv)
    model = tiny_or(args.model)
    out = ROOT / "artifacts" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    rows = [measure(front, model, args, out) for front in args.fronts.split(",")]
    print_table(rows, args)
    plot(rows, out / "routing.png")
    print(f"\nplot: {out / 'routing.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
