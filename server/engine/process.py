"""The engine in a process of its own (`--engine-process`), as vLLM splits its API server from its
engine core.

In one process the event loop's per-token work (SSE formatting, socket writes) and the engine
thread's torch calls take turns on one GIL: each torch call releases it and must win it back.
Here the API process keeps HTTP, tokenisation and image preprocessing; the engine process runs
the model, the scheduler and the vision stage, and sends each step's events and stats in one
message. Requests, aborts and vision-cache lookups go the other way. Messages are the typed
dataclasses below.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import multiprocessing as mp
import os
import queue
import signal
import threading
from dataclasses import dataclass

import numpy as np

from .interface import EngineDead
from .streams import RequestStream, StreamRegistry
from .types import CachedImage, EngineRequest, EngineStats, ErrorKind, Event, ModelInfo

log = logging.getLogger(__name__)


# -- messages: API process -> engine process ---------------------------------------------------
@dataclass
class AddRequest:
    request: EngineRequest  # without its pixel arrays, which follow the message raw
    arrays: list[tuple[int, tuple, str]]  # (image index, shape, dtype) of each array that follows


@dataclass
class AbortRequest:
    request_id: str


@dataclass
class LookupImage:
    key: int  # matches the answer to the question
    digest: str


@dataclass
class Shutdown:
    pass


# -- messages: engine process -> API process ---------------------------------------------------
@dataclass
class Ready:
    info: ModelInfo  # without the tokenizer (the API process loads its own)


@dataclass
class LoadFailed:
    reason: str


@dataclass
class StepReport:
    events: list[tuple[str, Event]]
    stats: EngineStats


@dataclass
class ImageFound:
    key: int
    image: CachedImage | None


@dataclass
class Stopped:
    pass


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


def _serve_messages(engine, inbox, send) -> None:
    """The API process's messages, one at a time, until Shutdown or the engine stops."""
    while engine.alive:
        if not inbox.poll(0.25):
            continue
        msg = inbox.recv()
        if isinstance(msg, AddRequest):
            request = msg.request
            for index, shape, dtype in msg.arrays:  # its pixels follow, raw
                pixels = _read_array(inbox.fileno(), shape, dtype)
                request.images[index] = dataclasses.replace(request.images[index], pixels=pixels)
            try:
                engine.submit(request)
            except EngineDead:
                gone = Event.failed(ErrorKind.UNAVAILABLE, "the engine is not running")
                send(StepReport([(request.request_id, gone)], EngineStats()))
        elif isinstance(msg, AbortRequest):
            engine.abort(msg.request_id)
        elif isinstance(msg, LookupImage):
            send(ImageFound(msg.key, engine.cached_image(msg.digest)))
        elif isinstance(msg, Shutdown):
            break


def _engine_main(inbox, outbox, config) -> None:
    """Entry point of the engine process: load, warm up, then serve messages until Shutdown."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the API process decides when this one stops
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from .build import build_engine, configure_engine_logging

    configure_engine_logging(config)
    send_lock = threading.Lock()

    def send(msg) -> None:
        with send_lock:
            outbox.send(msg)

    try:
        engine = build_engine(config, sink=lambda batch, stats: send(StepReport(batch, stats)))
    except Exception as e:  # noqa: BLE001 - reported to the API process, which fails its start-up
        log.exception("engine process: loading failed")
        send(LoadFailed(f"{type(e).__name__}: {e}"))
        return
    # Ready first: the engine loop's first report must not arrive before it (messages meanwhile wait
    # in the pipe until the loop below reads them).
    send(Ready(dataclasses.replace(engine.info, tokenizer=None)))
    engine.start()
    try:
        _serve_messages(engine, inbox, send)
    except (EOFError, OSError):  # the API process is gone
        pass
    finally:
        engine.stop()
        try:
            send(Stopped())
        except (OSError, ValueError):  # the API process is gone
            pass


# -- the API process's side ------------------------------------------------------------------
class ProcessEngineClient:
    """An `EngineClient` backed by an engine process."""

    def __init__(self, config, on_stats=None, *, start_timeout: float | None = None):
        ctx = mp.get_context("spawn")  # CUDA cannot be used in a forked child
        down_r, self._down = ctx.Pipe(duplex=False)  # requests, aborts, lookups: API -> engine
        self._up, up_w = ctx.Pipe(duplex=False)  # events, stats, answers: engine -> API
        for conn in (self._down, self._up):
            _enlarge(conn)
        self.on_stats = on_stats
        self.process = ctx.Process(target=_engine_main, args=(down_r, up_w, config), name="slime-engine-process",
                                   daemon=True)
        self.process.start()
        down_r.close()
        up_w.close()
        # Messages go out from a thread of their own: sending a request's pixels blocks until the
        # engine process has read them, which must not stall the event loop.
        self._outq: queue.SimpleQueue = queue.SimpleQueue()
        self._streams = StreamRegistry(self.abort)
        self._lookups: dict[int, list] = {}
        self._lookup_ids = itertools.count()
        self._alive = False
        msg = self._recv_start(start_timeout)
        if not isinstance(msg, Ready):
            self.process.join(5)
            raise RuntimeError(f"the engine process failed to start: {msg.reason}")
        from model.loading import load_tokenizer

        # tokenising stays in this process: the engine process sends token ids only
        self.info: ModelInfo = dataclasses.replace(msg.info, tokenizer=load_tokenizer(config.model))
        self._alive = True
        self._reader = threading.Thread(target=self._read, name="slime-engine-reader", daemon=True)
        self._reader.start()
        self._writer = threading.Thread(target=self._write, name="slime-engine-writer", daemon=True)
        self._writer.start()

    def _recv_start(self, timeout: float | None) -> Ready | LoadFailed:
        while not self._up.poll(1.0):
            if not self.process.is_alive():
                return LoadFailed(f"exit code {self.process.exitcode}")
            if timeout is not None:
                timeout -= 1.0
                if timeout <= 0:
                    self.process.kill()
                    return LoadFailed("timed out")
        try:
            return self._up.recv()
        except EOFError:
            return LoadFailed(f"exit code {self.process.exitcode}")

    def _send(self, msg) -> None:
        self._outq.put(msg)

    def _write(self) -> None:
        while True:
            msg = self._outq.get()
            if msg is None:
                return
            try:
                if isinstance(msg, EngineRequest):
                    request, arrays = _split_pixels(msg)
                    self._down.send(AddRequest(request, [(i, a.shape, a.dtype.str) for i, a in arrays]))
                    for _, array in arrays:
                        _write_array(self._down.fileno(), array)
                else:
                    self._down.send(msg)
            except OSError:  # the engine process is gone; the reader reports it
                return

    # -- the EngineClient interface --------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self._alive

    def submit(self, request: EngineRequest) -> RequestStream:
        if not self._alive:
            raise EngineDead("the engine is not running")
        stream = self._streams.open(request.request_id)
        if not self._alive:  # died meanwhile: the reader's last sweep may have missed this stream
            self._streams.discard(request.request_id)
            raise EngineDead("the engine is not running")
        self._send(request)
        return stream

    def abort(self, request_id: str) -> None:
        self._streams.discard(request_id)
        self._send(AbortRequest(request_id))

    @property
    def num_requests(self) -> int:
        return len(self._streams)

    def cached_image(self, digest: str) -> CachedImage | None:
        """Ask the engine process's vision cache (and pin the entry): called from a worker thread."""
        if not self._alive:
            return None
        key = next(self._lookup_ids)
        slot: list = [threading.Event(), None]
        self._lookups[key] = slot
        try:
            self._send(LookupImage(key, digest))
            if not slot[0].wait(10):
                return None
        finally:
            self._lookups.pop(key, None)
        return slot[1]

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.is_alive():
            self._send(Shutdown())
            self.process.join(timeout)
            if self.process.is_alive():
                self.process.kill()
                self.process.join(5)
        self._outq.put(None)
        self._alive = False

    # -- the reader thread ----------------------------------------------------------------------
    def _read(self) -> None:
        try:
            while True:
                msg = self._up.recv()
                if isinstance(msg, StepReport):
                    if msg.events:
                        self._streams.dispatch(msg.events)
                    if self.on_stats is not None:
                        try:
                            self.on_stats(msg.stats)
                        except Exception:  # noqa: BLE001 - a metrics bug must not cut off the events
                            log.exception("observing the engine process's stats failed")
                elif isinstance(msg, ImageFound):
                    slot = self._lookups.get(msg.key)
                    if slot is not None:
                        slot[1] = msg.image
                        slot[0].set()
                elif isinstance(msg, Stopped):
                    break
        except (EOFError, OSError):
            log.error("the engine process exited (code %s)", self.process.exitcode)
        finally:
            self._alive = False
            for slot in list(self._lookups.values()):  # lookups waiting for an answer: none will come
                slot[0].set()
            gone = Event.failed(ErrorKind.UNAVAILABLE, "the engine stopped")
            self._streams.dispatch([(rid, gone) for rid in self._streams.ids()])
