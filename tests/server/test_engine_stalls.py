"""Nothing a request brings stalls the engine thread: a fresh schema is compiled once per process,
off the engine thread, and a running stream keeps its pace while schemas and slow image URLs
arrive."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest

from model.sampling import SamplingParams
from server.chat import ChatService
from server.engine.client import Engine
from server.engine.engine import EngineCore
from server.engine.runner import ModelRunner
from server.engine.types import EngineRequest
from server.protocol import ChatCompletionRequest
from server.settings import Settings
from tests.live import image_message, start_server_process, stop_process
from tests.server.test_fetch import Target


def _schema(i: int) -> dict:
    props = {f"field_{i}_{j}": {"type": "object", "properties": {f"a{k}": {"type": "string", "maxLength": 20 + k}
                                                               for k in range(8)}, "required": ["a0"]}
             for j in range(16)}
    return {"type": "object", "properties": props, "required": [f"field_{i}_0"], "additionalProperties": False}


class _Counting:
    """Stands in for llguidance.LLMatcher and records on which thread each grammar is built."""

    def __init__(self, real):
        self.real = real
        self.threads: list[str] = []

    def __call__(self, *args, **kwargs):
        self.threads.append(threading.current_thread().name)
        return self.real(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.real, name)


@pytest.fixture
def counting(monkeypatch):
    import llguidance

    spy = _Counting(llguidance.LLMatcher)
    monkeypatch.setattr(llguidance, "LLMatcher", spy)
    return spy


def test_a_fresh_schema_is_compiled_once_per_process_never_on_the_engine_thread(tiny_dir, tiny_lm, counting):
    engine = Engine(ModelRunner(tiny_lm, max_batch_size=4, max_model_len=512))
    engine.runner.warm_up()
    with engine:
        chat = ChatService(Settings(model=str(tiny_dir), device="cpu"), engine)
        req = ChatCompletionRequest.model_validate({
            "model": "tiny", "max_tokens": 8, "messages": [{"role": "user", "content": "fill it"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": _schema(1)}}})
        before = len(counting.threads)
        body = asyncio.run(chat.complete(req))
        assert body.choices[0].finish_reason in ("stop", "length")
        built = counting.threads[before:]
        assert len(built) == 1, built  # before: once to validate it, once more in the engine
        assert built[0].startswith("slime-prep")
    # the engine process's core: a request handed over compiles on a thread of its own
    events = []
    with EngineCore(engine.runner, sink=lambda batch, stats: events.extend(batch), compile_grammars=True) as engine:
        spec = ("json_schema", json.dumps(_schema(2), sort_keys=True))
        engine.submit(EngineRequest("d1", [1, 5, 6], [], SamplingParams(max_tokens=4, grammar=spec), 3))
        for _ in range(200):
            if any(ev.finish_reason for _, ev in events):
                break
            time.sleep(0.02)
        assert any(ev.finish_reason for _, ev in events)
        built = counting.threads[before + 1:]  # neither the engine thread nor the handing one
        assert len(built) == 1 and built[0].startswith("slime-grammar"), built


def test_a_stream_keeps_its_pace_while_fresh_schemas_and_slow_image_urls_arrive(tiny_dir):
    """A fresh server process (nothing imported ahead of time). One text stream runs; 8 requests with
    schemas never seen and 8 with an image URL that drips forever arrive. The stream's longest gap
    between chunks stays under 250 ms (before: the first mask froze the engine 2.5 s)."""
    target = Target()
    proc, url = start_server_process(tiny_dir, "--allow-image-urls", "--image-url-allow-private",
                                     "--image-url-timeout", "2")
    stream_body = {"model": "tiny", "max_tokens": 600, "ignore_eos": True, "temperature": 0, "stream": True,
                   "messages": [{"role": "user", "content": "talk"}]}
    schema_body = [{"model": "tiny", "max_tokens": 32, "messages": [{"role": "user", "content": "fill"}],
                    "response_format": {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": _schema(i)}}}
                   for i in range(8)]
    url_body = [{"model": "tiny", "max_tokens": 4, "messages": [image_message(f"look {i}", target.url("/drip"))]}
                for i in range(8)]
    try:
        async def run():
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                arrivals: list[float] = []
                burst_at: list[float] = []

                async def stream():
                    async with client.stream("POST", "/v1/chat/completions", json=stream_body) as r:
                        async for line in r.aiter_lines():
                            if line.startswith("data: ") and '"content"' in line:
                                arrivals.append(time.monotonic())

                streaming = asyncio.create_task(stream())
                while len(arrivals) < 20:
                    await asyncio.sleep(0.01)
                burst_at.append(time.monotonic())
                burst = [asyncio.create_task(client.post("/v1/chat/completions", json=b))
                         for b in schema_body + url_body]
                answers = await asyncio.gather(*burst)
                await streaming
                return arrivals, burst_at[0], answers

        arrivals, burst_at, answers = asyncio.run(run())
        assert [a.status_code for a in answers[:8]] == [200] * 8, [a.text for a in answers[:8] if a.status_code != 200]
        assert all(a.status_code == 400 and a.json()["error"]["code"] == "image_url_failed" for a in answers[8:])
        during = [t for t in arrivals if t >= burst_at]
        assert len(during) > 50  # the stream ran through the burst
        gaps = [b - a for a, b in zip(arrivals, arrivals[1:]) if b >= burst_at]
        assert max(gaps) < 0.25, f"longest gap {max(gaps) * 1000:.0f} ms"
    finally:
        stop_process(proc)
        target.close()
