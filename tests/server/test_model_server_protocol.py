"""The gauges of the model-server protocol that gateways read (vLLM's names, beside ours): waiting
> 0 under overload, running = the requests decoding, KV usage in [0, 1], the cache's config."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from server.settings import Settings
from tests.live import LiveServer

MODEL = "tiny"


def _gauges(s: LiveServer) -> dict[str, float]:
    """The protocol's gauges, from one scrape."""
    names = ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
             "vllm:gpu_cache_usage_perc")
    out = {}
    for line in httpx.get(s.url + "/metrics", timeout=30).text.splitlines():
        head, _, value = line.rpartition(" ")
        name, _, labels = head.partition("{")
        if name in names and f'model_name="{MODEL}"' in labels:
            out[name] = float(value)
    assert set(out) == set(names), out
    return out


@pytest.mark.parametrize("engine_process", [False, True], ids=["in-process", "engine-process"])
def test_the_gauges_move_with_load(tiny_dir, engine_process):
    with LiveServer(Settings(model=str(tiny_dir), device="cpu", served_model_name=MODEL, max_batch_size=2,
                             max_waiting_requests=64, kv_cache_mb=4, engine_process=engine_process)) as s:
        idle = _gauges(s)
        assert idle["vllm:num_requests_running"] == 0 and idle["vllm:num_requests_waiting"] == 0
        config = [line for line in httpx.get(s.url + "/metrics").text.splitlines()
                  if line.startswith("vllm:cache_config_info{")]
        assert len(config) == 1 and 'block_size="16"' in config[0] and config[0].endswith(" 1.0")
        backend = [line for line in httpx.get(s.url + "/metrics").text.splitlines()
                   if line.startswith("slime_attention_backend_info{")]
        assert backend == ['slime_attention_backend_info{backend="cpu"} 1.0']  # auto's choice on CPU float32
        seen: list[dict[str, float]] = []

        async def load():
            async with httpx.AsyncClient(timeout=120) as c:
                body = {"model": MODEL, "prompt": "go", "max_tokens": 200, "ignore_eos": True}
                tasks = [asyncio.create_task(c.post(s.url + "/v1/completions", json=body)) for _ in range(6)]
                while not all(t.done() for t in tasks):
                    seen.append(await asyncio.to_thread(_gauges, s))
                    await asyncio.sleep(0.05)
                return [t.result().status_code for t in tasks]

        assert asyncio.run(load()) == [200] * 6
        assert max(g["vllm:num_requests_waiting"] for g in seen) > 0  # 6 requests, 2 slots
        assert max(g["vllm:num_requests_running"] for g in seen) == 2
        assert all(0 <= g["vllm:kv_cache_usage_perc"] <= 1 for g in seen)
        assert max(g["vllm:kv_cache_usage_perc"] for g in seen) > 0
        assert all(g["vllm:kv_cache_usage_perc"] == g["vllm:gpu_cache_usage_perc"] for g in seen)
        deadline = time.time() + 10
        while time.time() < deadline and _gauges(s)["vllm:num_requests_running"]:
            time.sleep(0.05)
        assert _gauges(s)["vllm:num_requests_running"] == 0 == _gauges(s)["vllm:num_requests_waiting"]
