"""Replicas of the server (real processes, tiny checkpoint) behind the real cache-aware gateway
(vllm-router, started through docker/router/entrypoint.sh as the image starts it) and behind
nginx least-connections: where conversations land, and what happens when a replica dies."""

from __future__ import annotations

import asyncio
import signal
import time

import httpx
import pytest

from bench.routing import POLICIES, run_front, start_gateway, start_nginx
from bench.sse_client import stream_events
from tests.live import free_port, start_server_process, stop_process
from tests.tools import tool

pytestmark = [pytest.mark.deploy, pytest.mark.slow]

REPLICAS = 3


def _gateway_tool() -> None:
    tool("vllm-router", "the PyPI package vllm-router (pip install -e .[deploy])")


@pytest.fixture(scope="module")
def replicas(tiny_dir):
    """Three servers on fixed ports (a killed one comes back on its own port)."""
    ports = [free_port() for _ in range(REPLICAS)]
    procs = [start_server_process(tiny_dir, port=p)[0] for p in ports]
    yield procs, ports
    for p in procs:
        if p.poll() is None:
            stop_process(p, timeout=10)


def _urls(ports):
    return [f"http://127.0.0.1:{p}" for p in ports]


def test_follow_up_turns_return_to_the_replica_holding_their_image(replicas, tmp_path, tiny_dir):
    _gateway_tool()
    tool("nginx", "the Debian package nginx")
    _, ports = replicas
    urls = _urls(ports)
    workload = dict(conversations=6, turns=4, system_chars=1500, max_tokens=6)
    # sessions (x-session-id) stick to a replica; new ones go to the least loaded
    gateway = start_gateway(urls, tmp_path / "gateway.log", *POLICIES["sticky"])
    try:
        routed = run_front("sticky", gateway.url, urls, tiny_dir.name, session=True, **workload)
    finally:
        gateway.stop()
    lb = start_nginx(ports, tmp_path / "nginx", tmp_path / "nginx.log")
    try:  # new images: the gateway run left its own in every cache it touched
        spread = run_front("nginx", lb.url, urls, tiny_dir.name, first_image=100, **workload)
    finally:
        lb.stop()
    assert routed.errors == 0 and spread.errors == 0, [t.error for t in routed.turns + spread.turns if t.error]
    assert routed.follow_up_hit_rate >= 0.9, routed
    # least-conn scatters the turns: about one follow-up in three finds its image
    assert spread.follow_up_hit_rate < routed.follow_up_hit_rate, (spread, routed)
    assert all(n >= 4 for n in routed.per_replica_requests), routed.per_replica_requests  # still spread


async def _stream(url: str, model: str, text: str, max_tokens: int, session: str | None = None) -> tuple[int, str]:
    """(tokens, error) of one streamed request; a cut stream is an error, never a hang."""
    body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "ignore_eos": True}
    tokens = 0
    try:
        async for event in stream_events(url, "/v1/chat/completions", body,
                                         {"x-session-id": session} if session else None):
            if event.get("error"):
                return tokens, f"error event: {event['error'].get('message')}"
            tokens += sum(1 for c in event.get("choices") or [] if (c.get("delta") or {}).get("content"))
    except Exception as e:
        return tokens, f"{type(e).__name__}: {e}"
    return tokens, ""


def _requests_served(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("slime_requests_total{"))


TOKENS = 1500  # long enough that every stream is still decoding when a replica dies


def _running(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=5).text
    return next(float(line.split()[1]) for line in text.splitlines() if line.startswith("slime_num_requests_running "))


async def _busiest_replica_once_spread(urls: list[str], timeout: float = 30) -> int:
    """The index of the replica running the most streams, once at least two replicas run some
    (so the kill leaves streams elsewhere that must finish)."""
    deadline = time.time() + timeout
    while True:
        running = await asyncio.gather(*(asyncio.to_thread(_running, u) for u in urls))
        if sum(1 for r in running if r > 0) >= 2:
            return max(range(len(urls)), key=lambda i: running[i])
        assert time.time() < deadline, f"the streams never spread over two replicas: {running}"
        await asyncio.sleep(0.1)


def test_a_replica_killed_under_load_fails_only_its_requests_and_comes_back(replicas, tmp_path, tiny_dir):
    _gateway_tool()
    procs, ports = replicas
    urls = _urls(ports)
    gateway = start_gateway(urls, tmp_path / "gateway.log", *POLICIES["sticky"], "--health-check-interval-secs", "1",
                            "--health-failure-threshold", "1", "--health-success-threshold", "1")
    model = tiny_dir.name
    try:
        async def under_load():
            # nine sessions over three replicas: least-loaded placement spreads them
            streams = [asyncio.create_task(_stream(gateway.url, model, f"long story number {i}", TOKENS, f"s{i}"))
                       for i in range(9)]
            victim = await _busiest_replica_once_spread(urls)  # poll: fixed sleeps raced fast machines
            procs[victim].send_signal(signal.SIGKILL)
            return victim, await asyncio.wait_for(asyncio.gather(*streams), timeout=120)  # nothing hangs

        victim, results = asyncio.run(under_load())
        procs[victim].wait(10)
        failed = [e for _, e in results if e]
        done = [n for n, e in results if not e]
        assert done and all(n == TOKENS for n in done), results  # the other replicas' streams finish
        assert failed, results  # the dead replica's in-flight streams end with an error, not silently

        async def after():
            return await asyncio.gather(*(_stream(gateway.url, model, f"after the crash {i}", 4, f"s{i}")
                                          for i in range(9)))

        time.sleep(3)  # the gateway's health check has seen the dead replica
        assert all(not e for _, e in asyncio.run(after())), "new requests go to the live replicas"

        procs[victim] = start_server_process(tiny_dir, port=ports[victim])[0]  # it returns on its port
        deadline = time.time() + 60
        i = 0
        while _requests_served(urls[victim]) == 0:
            assert time.time() < deadline, "the gateway never sent the returned replica any traffic"
            n, e = asyncio.run(_stream(gateway.url, model, f"is anyone back {i}", 2))
            assert not e, e
            i += 1
    finally:
        gateway.stop()
