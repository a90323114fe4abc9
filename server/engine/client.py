"""The in-process engine client: the engine core on a thread of this process, each request's
events on a `RequestStream` of the caller's event loop."""

from __future__ import annotations

import logging
from typing import Callable

from .engine import EngineCore
from .interface import EngineDead
from .runner import ModelRunner
from .streams import RequestStream, StreamRegistry
from .types import EngineRequest, EngineStats, Event

log = logging.getLogger(__name__)

StatsObserver = Callable[[EngineStats], None]


class Engine(EngineCore):
    """The in-process client (implements `EngineClient`): the core on a thread of this process,
    each request's events on a `RequestStream` of the caller's event loop."""

    def __init__(self, runner: ModelRunner, *, on_stats: StatsObserver | None = None, **kwargs):
        self._streams = StreamRegistry(self.abort)
        self.on_stats = on_stats
        super().__init__(runner, sink=self._to_streams, **kwargs)

    def submit(self, request: EngineRequest) -> RequestStream:  # type: ignore[override]
        """Hand a request to the engine now; iterate the returned stream for its events. Closing
        the stream early (client gone) aborts the request and frees its blocks at the next step."""
        if not self.alive:
            raise EngineDead("the engine is not running")
        stream = self._streams.open(request.request_id)
        try:
            super().submit(request)
        except EngineDead:
            self._streams.discard(request.request_id)
            raise
        if not self.alive:  # stopped meanwhile: its last sweep may have missed this stream
            self._streams.discard(request.request_id)
            raise EngineDead("the engine is not running")
        return stream

    def abort(self, request_id: str) -> None:
        self._streams.discard(request_id)
        super().abort(request_id)

    def _to_streams(self, batch: list[tuple[str, Event]], stats: EngineStats) -> None:
        if batch:
            self._streams.dispatch(batch)
        if self.on_stats is not None:
            try:
                self.on_stats(stats)
            except Exception:  # noqa: BLE001 - a metrics bug must not stop the engine
                log.exception("the engine's stats observer failed")
