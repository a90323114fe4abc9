"""The vision stage: CLIP and both adapters for new requests' images on a thread of their own,
beside decoding, so a new request's images never stall the running streams (torch releases the
GIL). At a lower OS priority, so that on a busy CPU the decode steps run first."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from typing import Callable

from .types import EngineRequest

log = logging.getLogger(__name__)


def name_os_thread(name: str) -> None:
    """Give the calling thread its OS name (Linux, 15 bytes), seen in `top -H` and /proc; threads it
    starts (e.g. its OpenMP workers) inherit it, and its niceness."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def lower_priority(nice: int) -> None:
    """Add `nice` to the calling thread's niceness (Linux schedules threads individually)."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except (AttributeError, OSError) as e:  # not Linux / not permitted: run at normal priority
        log.warning("could not lower the vision thread's priority: %s", e)


class VisionStage:
    """Encodes requests' images one request at a time; `done(request, error)` is called from its
    thread when one is ready (error: the exception that failed it, or None)."""

    def __init__(self, encode: Callable[[EngineRequest], None], done: Callable[[EngineRequest, Exception | None], None],
                 *, wanted: Callable[[str], bool], nice: int = 0):
        self._encode = encode  # sets request.features
        self._done = done
        self._wanted = wanted  # False once the request was aborted: skip it
        self._nice = nice
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._stopping = threading.Event()  # queued requests are skipped, not encoded, once set
        self.thread: threading.Thread | None = None
        self.pending = 0  # submitted and not yet done (read by the engine thread only)

    def start(self) -> None:
        self.thread = threading.Thread(target=self._loop, name="slime-vision", daemon=True)
        self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._inbox.put(None)
        if self.thread:
            self.thread.join(timeout)

    def submit(self, request: EngineRequest) -> None:
        self.pending += 1
        self._inbox.put(request)

    def _loop(self) -> None:
        name_os_thread("slime-vision")
        if self._nice:
            lower_priority(self._nice)
        while True:
            request = self._inbox.get()
            if request is None:
                return
            if self._stopping.is_set() or not self._wanted(request.request_id):  # stopping, or aborted while queued
                self._done(request, None)
                continue
            t0 = time.perf_counter()
            try:
                self._encode(request)
                request.vision_seconds = time.perf_counter() - t0
                self._done(request, None)
            except Exception as e:  # noqa: BLE001 - fails this request only
                log.exception("vision encoding failed for %s", request.request_id)
                self._done(request, e)
