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


def test_stream_cut_short_is_an_error_not_a_short_result():
    async def run():
        async def handle(reader, writer):
            await reader.readuntil(b"\r\n\r\n")
            await reader.read(100)
            chunk = b'data: {"choices": []}\n\n'
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                         + b"%x\r\n" % len(chunk) + chunk + b"\r\n")
            await writer.drain()
            writer.close()  # no terminating chunk, no [DONE]

        srv = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        try:
            return [e async for e in stream_events(f"http://127.0.0.1:{port}", "/x", {"a": 1})]
        finally:
            srv.close()

    with pytest.raises(HTTPError, match="middle of the body"):
        asyncio.run(run())
