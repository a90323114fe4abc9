"""What reaches the engine thread (its inbox of typed messages, dispatched by type) and where each
step's output goes (a `Sink`)."""

from __future__ import annotations

import queue
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, Union

from .types import EngineRequest, EngineStats, Event

# Where a step's (request_id, Event) pairs and its stats go
Sink = Callable[[list[tuple[str, Event]], EngineStats], None]


@dataclass
class Add:
    """A request submitted (its grammar compiled, where it has one)."""
    request: EngineRequest


@dataclass
class Abort:
    request_id: str


@dataclass
class VisionDone:
    """The vision stage encoded a request's images (or failed to: `error`)."""
    request: EngineRequest
    error: Exception | None


Message = Union[Add, Abort, VisionDone, None]  # None: wake up (stopping)


class Inbox:
    """The engine thread's queue, any thread putting. With `compile_grammar`, a request whose
    grammar is new is compiled on a thread of its own, in order, before it gets in (the engine
    process's: its API side compiled the grammar in another process), never on the engine thread."""

    def __init__(self, compile_grammar: Callable[[EngineRequest], None] | None = None):
        self._queue: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self._compile = compile_grammar
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slime-grammar") \
            if compile_grammar is not None else None

    def add(self, request: EngineRequest) -> None:
        if self._pool is not None and request.params.grammar is not None:
            self._pool.submit(self._compile_then_add, request)
        else:
            self.put(Add(request))

    def _compile_then_add(self, request: EngineRequest) -> None:
        self._compile(request)  # type: ignore[misc]
        self.put(Add(request))

    def put(self, message: Message) -> None:
        self._queue.put(message)

    def drain(self, wait: float) -> Iterator[Message]:
        """Every message now here, after waiting up to `wait` seconds for the first (0: none)."""
        try:
            item = self._queue.get(timeout=wait) if wait else self._queue.get_nowait()
        except queue.Empty:
            return
        while item is not None:
            yield item
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self.put(None)
