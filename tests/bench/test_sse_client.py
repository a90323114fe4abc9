import asyncio

import httpx
import pytest

from bench.sse_client import HTTPError, stream_events

MODEL = "tiny"


def _collect(url: str, body: dict) -> list[dict]:
    async def run():
        return [e async for e in stream_events(url, "/v1/chat/completions", body)]

    return asyncio.run(run())


def test_stream_events_yields_every_chunk_until_done(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 12,
            "temperature": 0, "ignore_eos": True}
    whole = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()
    events = _collect(server.url, {**body, "stream": True, "stream_options": {"include_usage": True}})
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    assert events[-1]["usage"]["completion_tokens"] == 12
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "length"


def test_stream_events_raises_on_http_errors(server):
    with pytest.raises(HTTPError, match="404"):
        _collect(server.url, {"model": "nope", "messages": [{"role": "user", "content": "hi"}], "stream": True})
