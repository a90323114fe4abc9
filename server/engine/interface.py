"""The one interface the API layer uses to reach an engine, in this process or in its own."""

from __future__ import annotations

from typing import AsyncIterator, Protocol, runtime_checkable

from .types import CachedImage, EngineRequest, Event, ModelInfo


class EngineDead(RuntimeError):
    """The engine is not running: nothing can be submitted."""


@runtime_checkable
class EngineClient(Protocol):
    """Implemented by `engine.Engine` (a thread here) and `process.ProcessEngineClient` (a process).

    Built and loaded by `factory.start_engine`; `alive` is its health."""

    info: ModelInfo

    @property
    def alive(self) -> bool: ...

    @property
    def num_requests(self) -> int:
        """Requests submitted and not yet finished or aborted."""
        ...

    def submit(self, request: EngineRequest) -> AsyncIterator[Event]:
        """Hand a request over; iterate its events. Closing the stream early aborts the request.
        Raises EngineDead when the engine is not running."""
        ...

    def abort(self, request_id: str) -> None: ...

    def cached_image(self, digest: str) -> CachedImage | None:
        """A vision-cache hit for an upload's digest, pinned for its request (from a worker thread)."""
        ...

    def stop(self, timeout: float = 10.0) -> None: ...
