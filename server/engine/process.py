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
import dataclasses
import itertools
import logging
import multiprocessing as mp
import os
import queue
import signal
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from .engine import EngineDead, RequestStream, dispatch
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
def _enlarge(conn) -> None:
    """A 1 MiB pipe buffer (Linux; the default is 64 KiB): a request's pixels (~10 MB) cross in
    ten reads instead of ~150, each of which must win the receiving process's GIL."""
    try:
        import fcntl

        fcntl.fcntl(conn.fileno(), 1031, 1 << 20)  # F_SETPIPE_SZ
    except (ImportError, OSError):
        pass


# Pixels cross the pipe as raw bytes, written from and read into the arrays themselves: two
# copies (into and out of the kernel) instead of ~five through pickling, for ~10 MB a request.
def _split_pixels(request: EngineRequest) -> tuple[EngineRequest, list]:
    """The request without its pixel arrays, and [(image index, array)] for those that had one."""
    arrays = [(i, img.pixels) for i, img in enumerate(request.images) if img.pixels is not None]
    if not arrays:
        return request, []
    images = [dataclasses.replace(img, pixels=None) for img in request.images]
    return dataclasses.replace(request, images=images), arrays


def _write_array(fd: int, array) -> None:
    view = memoryview(np.ascontiguousarray(array)).cast("B")
    while view:
        view = view[os.write(fd, view):]


def _read_array(fd: int, shape, dtype) -> np.ndarray:
    array = np.empty(shape, dtype=dtype)
    view = memoryview(array).cast("B")
    while view:
        n = os.readv(fd, [view])
        if n == 0:
            raise EOFError("the API process closed the pipe")
        view = view[n:]
    return array


def _engine_main(inbox, outbox, settings) -> None:
    """Entry point of the engine process: load, warm up, then serve messages until "stop"."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the API process decides when this one stops
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from ..app import build_engine
    from ..logs import configure_logging

    configure_logging(settings)
    send_lock = threading.Lock()

    def send(msg) -> None:
        with send_lock:
            outbox.send(msg)

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
                     accepts_images=lm.accepts_images)
    send(("ready", info))
    try:
        while engine.alive:
            if not inbox.poll(0.25):
                ops = metrics.drain()  # gauges updated while idle
                if ops:
                    send(("events", [], ops))
                continue
            msg = inbox.recv()
            kind = msg[0]
            if kind == "add":
                request = msg[1]
                for index, shape, dtype in msg[2]:  # its pixels follow, raw
                    pixels = _read_array(inbox.fileno(), shape, dtype)
                    request.images[index] = dataclasses.replace(request.images[index], pixels=pixels)
                try:
                    engine.submit_detached(request)
                except EngineDead:
                    gone = Event(finish_reason="error", error="the engine is not running", error_status=503,
                                 error_type="unavailable")
                    send(("events", [(request.request_id, gone)], []))
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
    tokenizer: Any = None  # loaded by the API process itself


@dataclass(frozen=True)
class CachedImage:
    """The engine process's answer to a vision-cache lookup: what the chat layer reads of it."""

    grid: Any


# -- the API process's side ------------------------------------------------------------------
class EngineClient:
    """The `Engine` interface the chat layer and the app use, backed by an engine process."""

    def __init__(self, settings, metrics=None, *, start_timeout: float | None = None):
        ctx = mp.get_context("spawn")  # CUDA cannot be used in a forked child
        down_r, self._down = ctx.Pipe(duplex=False)  # requests, aborts, lookups: API -> engine
        self._up, up_w = ctx.Pipe(duplex=False)  # events, metrics, answers: engine -> API
        for conn in (self._down, self._up):
            _enlarge(conn)
        self.metrics = metrics
        self.process = ctx.Process(target=_engine_main, args=(down_r, up_w, settings), name="slime-engine-process",
                                   daemon=True)
        self.process.start()
        down_r.close()
        up_w.close()
        # Messages go out from a thread of their own: sending a request's pixels blocks until the
        # engine process has read them, which must not stall the event loop.
        self._outq: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}
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
        self._writer = threading.Thread(target=self._write, name="slime-engine-writer", daemon=True)
        self._writer.start()

    def _recv_start(self, timeout: float | None):
        while not self._up.poll(1.0):
            if not self.process.is_alive():
                return ("failed", f"exit code {self.process.exitcode}")
            if timeout is not None:
                timeout -= 1.0
                if timeout <= 0:
                    self.process.kill()
                    return ("failed", "timed out")
        try:
            return self._up.recv()
        except EOFError:
            return ("failed", f"exit code {self.process.exitcode}")

    def _send(self, msg) -> None:
        self._outq.put(msg)

    def _write(self) -> None:
        while True:
            msg = self._outq.get()
            if msg is None:
                return
            try:
                if msg[0] == "add":
                    request, arrays = _split_pixels(msg[1])
                    self._down.send(("add", request, [(i, a.shape, a.dtype.str) for i, a in arrays]))
                    for _, array in arrays:
                        _write_array(self._down.fileno(), array)
                else:
                    self._down.send(msg)
            except OSError:  # the engine process is gone; the reader reports it
                return

    # -- the Engine interface --------------------------------------------------------------------
    def submit(self, request: EngineRequest) -> RequestStream:
        if not self.alive:
            raise EngineDead("the engine is not running")
        stream = RequestStream(self, request.request_id)  # type: ignore[arg-type]
        self._streams[request.request_id] = stream
        if not self.alive:  # died meanwhile: the reader's last sweep may have missed this stream
            self._streams.pop(request.request_id, None)
            raise EngineDead("the engine is not running")
        self._send(("add", request))
        return stream

    def abort(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        self._send(("abort", request_id))

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
            self._send(("stop",))
            self.process.join(timeout)
            if self.process.is_alive():
                self.process.kill()
                self.process.join(5)
        self._outq.put(None)
        self.alive = False

    # -- the reader thread ----------------------------------------------------------------------
    def _read(self) -> None:
        try:
            while True:
                msg = self._up.recv()
                kind = msg[0]
                if kind == "events":
                    self._dispatch(msg[1])
                    if self.metrics is not None and msg[2]:
                        try:
                            replay(self.metrics, msg[2])
                        except Exception:  # noqa: BLE001 - a metric bug must not cut off the events
                            log.exception("replaying the engine process's metric updates failed")
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
        dispatch(self._streams, batch)
