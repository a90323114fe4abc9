"""A lean streaming client for the benchmarks: HTTP/1.1 over asyncio streams, SSE parsed as it
arrives, one `json.loads` per event.

On these 2-core machines the client shares the CPU with the server; httpx's line iterator costs
several times more per token than this, which slows the server it is measuring (vLLM's serving
benchmark keeps its client lean for the same reason).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from urllib.parse import urlsplit


class HTTPError(RuntimeError):
    pass


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    status_line = await reader.readline()
    parts = status_line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        raise HTTPError(f"bad status line {status_line!r}")
    headers: dict[str, str] = {}
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


async def _body_chunks(reader: asyncio.StreamReader, headers: dict[str, str]) -> AsyncIterator[bytes]:
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            line = await reader.readline()
            if not line:
                raise HTTPError("connection closed in the middle of the body")
            size = int(line.split(b";")[0].strip(), 16)
            if size == 0:
                await reader.readline()
                return
            data = await reader.readexactly(size)
            await reader.readexactly(2)  # CRLF after each chunk
            yield data
    elif "content-length" in headers:
        yield await reader.readexactly(int(headers["content-length"]))
    else:
        yield await reader.read()


async def stream_events(url: str, path: str, body: dict, headers: dict[str, str] | None = None) -> AsyncIterator[dict]:
    """POST `body` as JSON (with any extra `headers`) and yield each SSE `data:` event (parsed)
    until `[DONE]`."""
    u = urlsplit(url)
    reader, writer = await asyncio.open_connection(u.hostname, u.port or 80)
    try:
        payload = json.dumps(body).encode()
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        writer.write(f"POST {path} HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Type: application/json\r\n{extra}"
                     f"Accept: text/event-stream\r\nContent-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
                     .encode() + payload)
        await writer.drain()
        status, headers = await _read_head(reader)
        if status != 200:
            text = b"".join([c async for c in _body_chunks(reader, headers)])
            raise HTTPError(f"HTTP {status}: {text[:300]!r}")
        buf = b""
        async for data in _body_chunks(reader, headers):
            buf += data
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                for line in event.split(b"\n"):
                    if not line.startswith(b"data: "):
                        continue
                    if line == b"data: [DONE]":
                        return
                    yield json.loads(line[6:])
        raise HTTPError("the stream ended without [DONE]")
    finally:
        writer.close()
