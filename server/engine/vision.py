"""The vision stage: CLIP and both adapters for new requests' images on a thread of their own,
beside decoding, so a new request's images never stall the running streams (torch releases the
GIL). At a lower OS priority, so that on a busy CPU the decode steps run first."""

from __future__ import annotations

import dataclasses
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


class FeatureBudget:
    """Bytes of encoded image features held by requests between the vision stage and their start
    (selection and embedding consume them; features that came from the vision cache count too,
    since the request keeps them alive). The vision stage encodes the next request only while the
    total is under `max_bytes` (0: no bound), so a deep queue of image requests holds at most the
    budget plus one pass's features, not all of them. Thread-safe."""

    def __init__(self, max_bytes: int, wanted: Callable[[str], bool]):
        self.max_bytes = max_bytes
        self._wanted = wanted
        self._held: dict[str, EngineRequest] = {}
        self._cond = threading.Condition()
        self.peak = 0  # the most bytes held at once
        self._per_view: float | None = None  # feature bytes per CLIP view, from the last encoding

    @property
    def held(self) -> int:
        with self._cond:
            return self._total()

    def _total(self) -> int:
        gone = [rid for rid, req in self._held.items() if req.features is None or not self._wanted(rid)]
        for rid in gone:  # started (features consumed), or ended
            del self._held[rid]
        # features several requests share (the choices of one request, one upload) count once
        unique = {id(f): f.nbytes for req in self._held.values() for f in req.features or ()}
        return sum(unique.values())

    def add(self, request: EngineRequest, views: int = 0) -> None:
        """`request` now holds its features (`views`: how many CLIP views they came from)."""
        nbytes = sum(f.nbytes for f in request.features or ())
        with self._cond:
            if views:
                self._per_view = nbytes / views
            self._held[request.request_id] = request
            self.peak = max(self.peak, self._total())

    def wait_for_room(self, stopping: threading.Event) -> None:
        """Until the held features are under the budget (at once if nothing is held: one request
        always goes through, however large)."""
        with self._cond:
            while self.max_bytes and not stopping.is_set() and self._held and self._total() >= self.max_bytes:
                self._cond.wait(0.05)

    def room_views(self) -> int | None:
        """CLIP views whose features fit in what is left of the budget (None: no bound; 0 before
        the first encoding says how large features are)."""
        if not self.max_bytes:
            return None
        with self._cond:
            if self._per_view is None:
                return 0
            return max(0, int((self.max_bytes - self._total()) // max(self._per_view, 1.0)))

    def notify(self) -> None:
        """Something may have been consumed (the engine calls this after each step)."""
        with self._cond:
            self._cond.notify_all()


def without_pixels(images: list) -> list:
    """The request's images with their pixel arrays dropped (`[views, 3, 336, 336]` float32 each),
    once its features exist. A new list: the choices of one request share the old one."""
    return [dataclasses.replace(img, pixels=None) if getattr(img, "pixels", None) is not None else img
            for img in images]


def _views(request: EngineRequest) -> int:
    """CLIP views a request's images need (none for those the chat layer found in the cache)."""
    return sum(img.pixels.shape[0] for img in request.images if getattr(img, "pixels", None) is not None)


class VisionStage:
    """Encodes the images of queued requests, as many requests at once as fit `batch_views` CLIP
    views (at least one, however large), while `budget` has room; `done(request, error)` is called
    from its thread for each (error: the exception that failed it, or None). A batch that fails is
    encoded again one request at a time, so that only the request that breaks it fails."""

    def __init__(self, encode: Callable[[list[EngineRequest]], None],
                 done: Callable[[EngineRequest, Exception | None], None], *, wanted: Callable[[str], bool],
                 nice: int = 0, budget: FeatureBudget | None = None, batch_views: int = 32):
        self._encode = encode  # sets each request's features
        self._done = done
        self._wanted = wanted  # False once the request was aborted: skip it
        self._nice = nice
        self.budget = budget if budget is not None else FeatureBudget(0, wanted)
        self.batch_views = batch_views
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._carried: EngineRequest | None = None  # taken from the inbox, for the next batch
        self._stopping = threading.Event()  # queued requests are skipped, not encoded, once set
        self.thread: threading.Thread | None = None
        self.pending = 0  # submitted and not yet done (read by the engine thread only)
        self.batches: list[int] = []  # requests per pass (the last 1,000), for tests and benchmarks

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

    def _fill(self, batch: list[EngineRequest]) -> tuple[list[EngineRequest], bool]:
        """`batch` (its first request) and those already queued behind it that fit the views
        budget and the features budget's room: (the pass, whether the stage stops after it)."""
        room = self.budget.room_views()
        limit = self.batch_views if room is None else min(self.batch_views, room)
        views = sum(_views(r) for r in batch)
        while views < limit:
            item = self._inbox.get_nowait() if not self._inbox.empty() else False
            if item is False:
                break
            if item is None:
                return batch, True
            if views + _views(item) > limit:
                self._carried = item
                break
            batch.append(item)
            views += _views(item)
        return batch, False

    def _live(self, batch: list[EngineRequest]) -> list[EngineRequest]:
        """The requests still wanted; the others (aborted while queued, or stopping) are done now."""
        live = []
        for request in batch:
            if self._stopping.is_set() or not self._wanted(request.request_id):
                self._done(request, None)
            else:
                live.append(request)
        return live

    def _loop(self) -> None:
        name_os_thread("slime-vision")
        if self._nice:
            lower_priority(self._nice)
        while True:
            first = self._carried if self._carried is not None else self._inbox.get()
            self._carried = None
            if first is None:
                return
            if not self._live([first]):
                continue
            self.budget.wait_for_room(self._stopping)
            batch, last = self._fill([first])
            self._run(self._live(batch))
            if last:
                return

    def _run(self, batch: list[EngineRequest]) -> None:
        if not batch:
            return
        t0 = time.perf_counter()
        try:
            self._encode(batch)
        except Exception as e:  # noqa: BLE001 - find which request fails it
            if len(batch) == 1:
                log.exception("vision encoding failed for %s", batch[0].request_id)
                self._done(batch[0], e)
                return
            log.warning("vision encoding failed for a batch of %d: encoding them one at a time", len(batch))
            for request in batch:
                t0 = time.perf_counter()
                try:
                    self._encode([request])
                except Exception as e1:  # noqa: BLE001 - fails this request only
                    log.exception("vision encoding failed for %s", request.request_id)
                    self._done(request, e1)
                    continue
                self._finish([request], t0)
            return
        self.batches = (self.batches + [len(batch)])[-1000:]
        self._finish(batch, t0)

    def _finish(self, requests: list[EngineRequest], t0: float) -> None:
        seconds = time.perf_counter() - t0
        for request in requests:
            request.vision_seconds = seconds
            views = _views(request)
            request.images = without_pixels(request.images)
            self.budget.add(request, views)
            self._done(request, None)
