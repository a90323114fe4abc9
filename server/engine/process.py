"""The engine in a process of its own (`--engine-process`), as vLLM splits its API server from its
engine core.

In one process the event loop's per-token work (SSE formatting, socket writes) and the engine
thread's torch calls take turns on one GIL: each torch call releases it and must win it back.
Here the API process keeps HTTP, tokenisation and image preprocessing; the engine process runs
the model, the scheduler and the vision stage, and sends each step's events (and the metric
updates it made) in one message. Requests, aborts and vision-cache lookups go the other way.
"""

from __future__ import annotations

import collections
import itertools
import logging
import multiprocessing as mp
import signal
import threading
from dataclasses import dataclass
from typing import Any

from .engine import RequestStream, _deliver
from .types import EngineRequest, Event

log = logging.getLogger(__name__)


# -- metrics: recorded in the engine process, replayed in the API process's registry -----------
class RecordingMetrics:
    """Stands in for `server.metrics.Metrics` in the engine process: every `.labels(...)`,
    `.observe`, `.inc` and `.set` is queued as (metric, labels, method, value)."""

    def __init__(self) -> None:
        self.ops: collections.deque = collections.deque()

    def __getattr__(self, name: str) -> "_Recorder":
        return _Recorder(self.ops, name, ())

    def drain(self) -> list:
        out = []
        while self.ops:
            out.append(self.ops.popleft())
        return out


@dataclass(frozen=True)
class _Recorder:
    ops: collections.deque
    name: str
    label_values: tuple

    def labels(self, *values) -> "_Recorder":
        return _Recorder(self.ops, self.name, values)

    def observe(self, value: float) -> None:
        self.ops.append((self.name, self.label_values, "observe", value))

    def inc(self, value: float = 1) -> None:
        self.ops.append((self.name, self.label_values, "inc", value))

    def set(self, value: float) -> None:
        self.ops.append((self.name, self.label_values, "set", value))


def replay(metrics, ops: list) -> None:
    for name, label_values, method, value in ops:
        metric = getattr(metrics, name)
        if label_values:
            metric = metric.labels(*label_values)
        getattr(metric, method)(value)


# -- the engine process ----------------------------------------------------------------------
def _engine_main(conn, settings) -> None:
    """Entry point of the engine process: load, warm up, then serve messages until "stop"."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the API process decides when this one stops
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from ..app import build_engine
    from ..logs import configure_logging

    configure_logging(settings)
    send_lock = threading.Lock()

    def send(msg) -> None:
        with send_lock:
            conn.send(msg)

    metrics = RecordingMetrics()
    try:
        lm, engine = build_engine(settings, metrics)
    except Exception as e:  # noqa: BLE001 - reported to the API process, which fails its start-up
        log.exception("engine process: loading failed")
        send(("failed", f"{type(e).__name__}: {e}"))
        return
    engine.deliver = lambda batch: send(("events", batch, metrics.drain()))
    engine.start()
    info = ModelInfo(cfg=lm.cfg, template=lm.template, image_norm=lm.image_norm,
                     accepts_images=lm.model.vision_tower is not None, stats=lm.stats)
    send(("ready", info))
    try:
        while engine.alive:
            if not conn.poll(0.25):
                ops = metrics.drain()  # gauges updated while idle
                if ops:
                    send(("events", [], ops))
                continue
            msg = conn.recv()
            kind = msg[0]
            if kind == "add":
                engine.submit_detached(msg[1])
            elif kind == "abort":
                engine.abort(msg[1])
            elif kind == "pin":
                feats = engine.cached_image(msg[2])
                send(("pinned", msg[1], None if feats is None else feats.grid))
            elif kind == "stop":
                break
    except (EOFError, OSError):  # the API process is gone
        pass
    finally:
        engine.stop()
        try:
            send(("events", [], metrics.drain()))
            send(("stopped",))
        except (OSError, ValueError):  # the API process is gone
            pass


@dataclass
class ModelInfo:
    """What the API process needs to know of the model (the weights stay in the engine process)."""

    cfg: Any
    template: str
    image_norm: Any
    accepts_images: bool
    stats: dict
    tokenizer: Any = None  # loaded by the API process itself


@dataclass(frozen=True)
class CachedImage:
    grid: Any


class EngineDeadError(RuntimeError):
    pass


# -- the API process's side ------------------------------------------------------------------
class EngineClient:
    """The `Engine` interface the chat layer and the app use, backed by an engine process."""

    def __init__(self, settings, metrics=None, *, start_timeout: float | None = None):
        ctx = mp.get_context("spawn")  # CUDA cannot be used in a forked child
        self._conn, child = ctx.Pipe()
        self.metrics = metrics
        self.process = ctx.Process(target=_engine_main, args=(child, settings), name="slime-engine-process",
                                   daemon=True)
        self.process.start()
        child.close()
        self._streams: dict[str, RequestStream] = {}
        self._send_lock = threading.Lock()
        self._pins: dict[int, list] = {}
        self._pin_ids = itertools.count()
        self.alive = False
        msg = self._recv_start(start_timeout)
        if msg[0] != "ready":
            self.process.join(5)
            raise RuntimeError(f"the engine process failed to start: {msg[1] if len(msg) > 1 else msg[0]}")
        self.info: ModelInfo = msg[1]
        self.alive = True
        self._reader = threading.Thread(target=self._read, name="slime-engine-reader", daemon=True)
        self._reader.start()

    def _recv_start(self, timeout: float | None):
        while not self._conn.poll(1.0):
            if not self.process.is_alive():
                return ("failed", f"exit code {self.process.exitcode}")
            if timeout is not None:
                timeout -= 1.0
                if timeout <= 0:
                    self.process.kill()
                    return ("failed", "timed out")
        try:
            return self._conn.recv()
        except EOFError:
            return ("failed", f"exit code {self.process.exitcode}")

    def _send(self, msg) -> None:
        with self._send_lock:
            self._conn.send(msg)

    # -- the Engine interface --------------------------------------------------------------------
    def submit(self, request: EngineRequest) -> RequestStream:
        if not self.alive:
            from .engine import EngineDead

            raise EngineDead("the engine is not running")
        stream = RequestStream(self, request.request_id)  # type: ignore[arg-type]
        self._streams[request.request_id] = stream
        try:
            self._send(("add", request))
        except OSError:
            self._streams.pop(request.request_id, None)
            raise
        return stream

    def abort(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        try:
            self._send(("abort", request_id))
        except OSError:
            pass

    @property
    def num_requests(self) -> int:
        return len(self._streams)

    def cached_image(self, digest: str) -> CachedImage | None:
        """Ask the engine process's vision cache (and pin the entry): called from a worker thread."""
        if not self.alive:
            return None
        key = next(self._pin_ids)
        slot: list = [threading.Event(), None]
        self._pins[key] = slot
        try:
            self._send(("pin", key, digest))
            if not slot[0].wait(10):
                return None
        finally:
            self._pins.pop(key, None)
        return None if slot[1] is None else CachedImage(slot[1])

    def start(self) -> None:  # started in __init__ (the Engine interface)
        pass

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.is_alive():
            try:
                self._send(("stop",))
            except OSError:
                pass
            self.process.join(timeout)
            if self.process.is_alive():
                self.process.kill()
                self.process.join(5)
        self.alive = False

    # -- the reader thread ----------------------------------------------------------------------
    def _read(self) -> None:
        try:
            while True:
                msg = self._conn.recv()
                kind = msg[0]
                if kind == "events":
                    self._dispatch(msg[1])
                    if self.metrics is not None and msg[2]:
                        replay(self.metrics, msg[2])
                elif kind == "pinned":
                    slot = self._pins.get(msg[1])
                    if slot is not None:
                        slot[1] = msg[2]
                        slot[0].set()
                elif kind == "stopped":
                    break
        except (EOFError, OSError):
            log.error("the engine process exited (code %s)", self.process.exitcode)
        finally:
            self.alive = False
            gone = Event(finish_reason="error", error="the engine stopped", error_status=503, error_type="unavailable")
            self._dispatch([(rid, gone) for rid in list(self._streams)])

    def _dispatch(self, batch: list) -> None:
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
