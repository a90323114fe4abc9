"""Per-request event streams on the caller's event loop, fed from engine threads."""

from __future__ import annotations

import asyncio
from typing import Callable

from .types import Event

_CLOSED = object()  # wakes a reader blocked on the queue when the stream is closed under it


class RequestStream:
    """Async iterator over one request's events; `aclose()` (or garbage collection) before the
    final event aborts the request and ends the iteration of any reader waiting on it."""

    def __init__(self, request_id: str, on_close: Callable[[str, bool], None]):
        self.request_id = request_id
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self._on_close = on_close  # (request_id, finished)
        self._closed = False

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> Event:
        if self._closed:
            raise StopAsyncIteration
        event = await self.queue.get()
        if event is _CLOSED:
            raise StopAsyncIteration
        if event.finish_reason is not None:
            self._close(finished=True)
        return event

    def _close(self, finished: bool = False) -> None:
        if not self._closed:
            self._closed = True
            self._on_close(self.request_id, finished)

    async def aclose(self) -> None:
        if not self._closed:
            self._close()
            self.queue.put_nowait(_CLOSED)  # on the loop: a reader blocked in __anext__ wakes and stops

    def __del__(self) -> None:
        self._close()


def _deliver(items) -> None:
    for stream, event in items:
        stream.queue.put_nowait(event)


class StreamRegistry:
    """The open streams of one engine client, by request id."""

    def __init__(self, abort: Callable[[str], None]):
        self._streams: dict[str, RequestStream] = {}
        self._abort = abort

    def __len__(self) -> int:
        return len(self._streams)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._streams

    def ids(self) -> list[str]:
        return list(self._streams)

    def open(self, request_id: str) -> RequestStream:
        stream = RequestStream(request_id, self._closed)
        self._streams[request_id] = stream
        return stream

    def discard(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    def _closed(self, request_id: str, finished: bool) -> None:
        self._streams.pop(request_id, None)
        if not finished:
            self._abort(request_id)

    def dispatch(self, batch: list[tuple[str, Event]]) -> None:
        """Hand (request_id, Event) pairs to their streams, one wake-up per event loop; events of
        streams already gone are dropped. Called from a thread that is not the loop's."""
        by_loop: dict = {}
        for request_id, event in batch:
            stream = self._streams.get(request_id)
            if stream is not None:
                by_loop.setdefault(stream.loop, []).append((stream, event))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # loop closed
                pass
