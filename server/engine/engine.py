"""The engine: a thread that owns the model and runs schedule -> execute -> update steps, and
an asyncio front that submits requests and streams their events back."""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time

from .runner import CacheMiss, ModelRunner
from .scheduler import Scheduler, Sequence
from .types import EngineRequest, Event

log = logging.getLogger(__name__)


def _deliver(items) -> None:
    for stream, event in items:
        stream.queue.put_nowait(event)


def dispatch(streams: dict, batch: list) -> None:
    """Hand (request_id, Event) pairs to their RequestStreams, one wake-up per event loop; events
    of streams already gone are dropped. Called from a thread that is not the loop's."""
    by_loop: dict = {}
    for request_id, event in batch:
        stream = streams.get(request_id)
        if stream is not None:
            by_loop.setdefault(stream.loop, []).append((stream, event))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_deliver, items)
        except RuntimeError:  # loop closed
            pass


def _name_os_thread(name: str) -> None:
    """Give the calling thread its OS name (Linux, 15 bytes), seen in `top -H` and /proc; threads it
    starts (e.g. its OpenMP workers) inherit it, and its niceness."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def _lower_priority(nice: int) -> None:
    """Add `nice` to the calling thread's niceness (Linux schedules threads individually): when the
    cores are all busy, the engine thread's decode steps run first and this thread takes the rest."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except (AttributeError, OSError) as e:  # not Linux / not permitted: run at normal priority
        log.warning("could not lower the vision thread's priority: %s", e)


class RequestStream:
    """Async iterator over one request's events; `aclose()` (or garbage collection) before the
    final event aborts the request."""

    def __init__(self, engine: "Engine", request_id: str):
        self.engine = engine
        self.request_id = request_id
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self._closed = False

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> Event:
        if self._closed:
            raise StopAsyncIteration
        event: Event = await self.queue.get()
        if event.finish_reason is not None:
            self._close(finished=True)
        return event

    def _close(self, finished: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        self.engine._streams.pop(self.request_id, None)
        if not finished:
            self.engine.abort(self.request_id)

    async def aclose(self) -> None:
        self._close()

    def __del__(self) -> None:
        self._close()


class EngineDead(RuntimeError):
    pass


class Engine:
    """Continuous batching over a fixed pool of KV-cache slots.

    Each step: admit a waiting request if a slot is free, run one prefill chunk of the sequence
    being prefilled (so running streams stall at most one chunk) -- or several short prompts whose
    total fits in one chunk -- then one batched decode forward for every decoding sequence.
    """

    def __init__(self, runner: ModelRunner, *, max_batch_size: int, prefill_chunk: int = 512,
                 metrics=None, vision_thread: bool = True, deliver=None, vision_nice: int = 0):
        self.runner = runner
        # Where a step's events go: by default to each request's RequestStream on its event loop;
        # `deliver(list[(request_id, Event)])` instead for requests added with `submit_detached`
        # (the engine process hands them to the API process, see `process.py`).
        self.deliver = deliver
        self.scheduler = Scheduler(num_slots=max_batch_size)
        self.prefill_chunk = prefill_chunk
        self.metrics = metrics
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, RequestStream | None] = {}  # None: detached (see `deliver`)
        self._by_id: dict[str, Sequence] = {}
        self._outbox: list = []
        self._thread: threading.Thread | None = None
        # Vision stage: CLIP and the adapters run on their own thread, beside decoding, so a new
        # request's images never stall the running streams (torch releases the GIL).
        self._vision_inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._vision_thread: threading.Thread | None = None
        self.use_vision_thread = vision_thread
        self.vision_nice = vision_nice
        self.in_vision = 0
        self._stop = threading.Event()
        self.alive = False
        self.steps = 0
        # Tests: callable(stage, requests) called inside each model stage ("vision", "prefill",
        # "decode", "sample") with the requests it serves; what it raises fails like a model error.
        self.fault_hook = None
        self._unattributed_failures = 0  # consecutive decode failures no request could be blamed for

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="slime-engine", daemon=True)
        self.alive = True
        self._thread.start()
        if self.use_vision_thread:
            self._vision_thread = threading.Thread(target=self._vision_loop, name="slime-vision", daemon=True)
            self._vision_thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._inbox.put(("wake", None))
        self._vision_inbox.put(None)
        if self._thread:
            self._thread.join(timeout)
        if self._vision_thread:
            self._vision_thread.join(timeout)
        self.alive = False

    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    # -- async front -----------------------------------------------------------------------------
    def submit(self, request: EngineRequest) -> "RequestStream":
        """Hand a request to the engine now; iterate the returned stream for its events. Closing
        the stream early (client gone) aborts the request and frees its slot at the next step."""
        if not self.alive:
            raise EngineDead("the engine is not running")
        stream = RequestStream(self, request.request_id)
        self._streams[request.request_id] = stream
        self._inbox.put(("add", request))
        return stream

    def submit_detached(self, request: EngineRequest) -> None:
        """Hand a request to the engine; its events go to `deliver`."""
        if not self.alive:
            raise EngineDead("the engine is not running")
        self._streams[request.request_id] = None
        self._inbox.put(("add", request))

    @property
    def num_requests(self) -> int:
        """Requests submitted and not yet finished or aborted."""
        return len(self._streams)

    def cached_image(self, digest: str):
        """Features of an already-seen upload (pinned for its request), or None."""
        cache = self.runner.vision_cache
        return cache.pin(digest) if cache is not None else None

    def abort(self, request_id: str) -> None:
        self._streams.pop(request_id, None)  # (a RequestStream has already left)
        self._inbox.put(("abort", request_id))

    def _emit(self, request_id: str, event: Event) -> None:
        """Queue an event; `_flush` hands a step's events on in one wake-up."""
        if request_id in self._streams:
            self._outbox.append((request_id, event))

    def _flush(self) -> None:
        if not self._outbox:
            return
        batch, self._outbox = self._outbox, []
        if self.deliver is not None:
            for request_id, event in batch:
                if event.finish_reason is not None:
                    self._streams.pop(request_id, None)
            self.deliver(batch)
            return
        dispatch(self._streams, batch)

    # -- engine thread ---------------------------------------------------------------------------
    def _loop(self) -> None:
        _name_os_thread("slime-engine")
        try:
            self._run()
        finally:
            self.alive = False

    def _run(self) -> None:
        while not self._stop.is_set():
            idle = self.scheduler.num_running == 0 and not self.scheduler.waiting
            try:
                item = self._inbox.get(timeout=0.5) if idle else self._inbox.get_nowait()
            except queue.Empty:
                item = None
            while item is not None:
                self._handle(item)
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    item = None
            if self.scheduler.num_running or self.scheduler.waiting:
                try:
                    self.step()
                except Exception:  # noqa: BLE001 - a bug in step bookkeeping must not kill the loop
                    log.exception("engine step failed")
                    for seq in list(self.scheduler.decoding) + ([self.scheduler.prefilling] if self.scheduler.prefilling else []):
                        self._fail(seq, "internal error in the engine step")
            self._flush()
            self._update_gauges()
        self.alive = False
        for seq in list(self.scheduler.decoding) + ([self.scheduler.prefilling] if self.scheduler.prefilling else []):
            self._fail(seq, "the server is shutting down", status=503, etype="unavailable")
        while self.scheduler.waiting:
            self.scheduler.waiting.popleft()
        # Everything still registered (waiting, in the vision stage, not yet picked up) ends now.
        for request_id in list(self._streams):
            self._emit(request_id, Event(finish_reason="error", error="the server is shutting down",
                                         error_status=503, error_type="unavailable"))
        self._flush()

    def _vision_loop(self) -> None:
        _name_os_thread("slime-vision")
        if self.vision_nice:
            _lower_priority(self.vision_nice)
        while True:
            req = self._vision_inbox.get()
            if req is None or self._stop.is_set():
                return
            if req.request_id not in self._streams:  # aborted while queued
                self._inbox.put(("vision_done", (req, None)))
                continue
            t0 = time.perf_counter()
            try:
                self._inject("vision", [req])
                req.features = self.runner.encode(req.images)
                req.vision_seconds = time.perf_counter() - t0
                self._inbox.put(("vision_done", (req, None)))
            except Exception as e:  # noqa: BLE001 - fail this request only
                log.exception("vision encoding failed for %s", req.request_id)
                self._inbox.put(("vision_done", (req, e)))

    def _handle(self, item) -> None:
        kind, payload = item
        if kind == "add":
            if payload.request_id not in self._streams:  # consumer already gone
                return
            if self.use_vision_thread and payload.images:
                self.in_vision += 1
                self._vision_inbox.put(payload)
            else:
                self.scheduler.add(payload)
        elif kind == "vision_done":
            req, error = payload
            self.in_vision -= 1
            if req.request_id not in self._streams:
                return
            if error is not None:
                status, etype = (503, "unavailable") if isinstance(error, CacheMiss) else (500, "server_error")
                msg = str(error) if isinstance(error, CacheMiss) else "model error during vision encoding"
                self._emit(req.request_id, Event(finish_reason="error", error=msg, error_status=status,
                                                 error_type=etype))
                if self.metrics:
                    self.metrics.requests.labels("error", "error").inc()
                return
            if self.metrics and req.vision_seconds:
                self.metrics.vision.observe(req.vision_seconds)
            self.scheduler.add(req)
        elif kind == "abort":
            if self.scheduler.drop_waiting(payload) is not None:
                return
            seq = self._by_id.get(payload)
            if seq is not None:
                self._release(seq)
                self._record_finish(seq, "abort", status="aborted")

    def step(self) -> None:
        self.steps += 1
        sched = self.scheduler
        budget = self.prefill_chunk  # prompt positions per step
        seq = sched.next_prefill()
        while seq is not None:
            budget -= self._prefill(seq)
            if sched.prefilling is not None:  # a long prompt mid-way: its next chunk is next step's
                break
            # Further prompts join this step only if they surely end within what is left of the
            # budget: a prompt's chunks never depend on what else was admitted (same numbers).
            nxt = sched.waiting[0] if sched.waiting else None
            if nxt is None or nxt.max_prompt_tokens > budget:
                break
            seq = sched.next_prefill()
        if sched.decoding:
            self._decode(list(sched.decoding))

    def _prefill(self, seq: Sequence) -> int:
        """One prefill chunk of `seq` (admitting it first); returns the prompt positions it ran."""
        req = seq.request
        before = seq.prefilled
        try:
            if seq.embeds is None and seq.prefilled == 0:
                self._by_id[req.request_id] = seq
                seq.scheduled_time = time.monotonic()
                if self.metrics:
                    self.metrics.queue_time.observe(seq.scheduled_time - req.arrival)
                self._inject("prefill", [req])
                t0 = time.perf_counter()
                inline_vision = seq.request.features is None and bool(seq.request.images)
                self.runner.begin(seq)
                self._record_images(seq, time.perf_counter() - t0 if inline_vision else None)
            first = self.runner.prefill_chunk(seq, self.prefill_chunk)
        except Exception as e:  # noqa: BLE001 - fail this request only
            log.exception("prefill failed for %s", req.request_id)
            if isinstance(e, CacheMiss):
                self._fail(seq, str(e), status=503, etype="unavailable")
                return 0
            bad_input = isinstance(e, ValueError)
            self._fail(seq, str(e) if bad_input else "model error during prefill", status=400 if bad_input else 500,
                       etype="invalid_request_error" if bad_input else "server_error")
            return 0
        ran = seq.prefilled - before
        if first is None:
            return ran
        move = self.scheduler.finish_prefill(seq)
        if move:
            self.runner.move(move[0], move[1], seq.prompt_len)
        token, info = first
        self._append(seq, token, info, images=seq.state.images)
        return ran

    # -- decode, with failures isolated to the sequences that cause them ---------------------------
    def _inject(self, stage: str, requests: list[EngineRequest]) -> None:
        if self.fault_hook is not None:
            self.fault_hook(stage, requests)

    def _forward(self, seqs: list[Sequence]):
        self._inject("decode", [s.request for s in seqs])
        return self.runner.forward(seqs)

    def _sample(self, logits, seqs: list[Sequence]):
        self._inject("sample", [s.request for s in seqs])
        return self.runner.sample(logits, seqs)

    def _decode(self, seqs: list[Sequence]) -> None:
        try:
            logits = self._forward(seqs)  # [B, V]
        except Exception:  # noqa: BLE001 - find who caused it; the others decode again next step
            log.exception("decode forward failed for a batch of %d", len(seqs))
            culprit = self._forward_culprit(seqs)
            if culprit is not None:
                self._unattributed_failures = 0
                self._fail(culprit, "model error during decoding")
            else:
                self._unattributed_failures += 1
                if self._unattributed_failures >= 3:  # persistent and nobody's in particular: give up on all
                    for s in seqs:
                        self._fail(s, "model error during decoding")
            return
        self._unattributed_failures = 0
        rng = self.runner.rng_states(seqs)
        try:
            results = list(zip(*self._sample(logits, seqs)))
        except Exception:  # noqa: BLE001 - sample each row alone: only the failing rows fail
            log.exception("sampling failed for a batch of %d; sampling row by row", len(seqs))
            self.runner.restore_rng_states(seqs, rng)
            results = []
            for i, s in enumerate(seqs):
                try:
                    tokens, infos = self._sample(logits[i:i + 1], [s])
                    results.append((tokens[0], infos[0]))
                except Exception:  # noqa: BLE001
                    log.exception("sampling failed for %s", s.request.request_id)
                    results.append(None)
        if self.metrics:
            self.metrics.batch_size.observe(len(seqs))
        # Count every sequence's token before freeing any slot: freeing one moves the batch's last
        # sequence into it, and the move copies `length` positions, which must include the entry
        # this step just wrote for it.
        finished, failed = [], []
        for s, result in zip(seqs, results):
            if result is None:
                failed.append(s)
                continue
            try:
                finish = self._append(s, result[0], result[1], release=False)
            except Exception:  # noqa: BLE001 - e.g. detokenising: this sequence only
                log.exception("finishing the step failed for %s", s.request.request_id)
                failed.append(s)
                continue
            if finish:
                finished.append((s, finish))
        for s, finish in finished:
            self._release(s)
            self._record_finish(s, finish)
        for s in failed:
            self._fail(s, "model error during decoding")

    def _forward_culprit(self, seqs: list[Sequence]) -> Sequence | None:
        """The sequence whose presence makes the decode forward fail: the last of the shortest
        failing prefix of the batch (prefixes keep sequence i in slot i), found by bisection. A
        forward rewrites the same cache entries a later successful one will, and samples nothing.
        None when no prefix fails again (a transient failure)."""
        def fails(k: int) -> bool:
            try:
                self._forward(seqs[:k])
                return False
            except Exception:  # noqa: BLE001
                return True

        lo, hi = 1, len(seqs)  # find the smallest failing k in [lo, hi]
        while lo < hi:
            mid = (lo + hi) // 2
            if fails(mid):
                hi = mid
            else:
                lo = mid + 1
        return seqs[lo - 1] if fails(lo) else None

    def _append(self, seq: Sequence, token: int, info, images=None, release: bool = True) -> str | None:
        """Record a sampled token and emit its event; returns the finish reason, if any. With
        `release`, a finished sequence frees its slot here; else the caller does it."""
        now = time.monotonic()
        req = seq.request
        seq.output_ids.append(token)
        m = self.metrics
        if seq.first_token_time is None:
            seq.first_token_time = now
            if m:
                m.ttft.observe(now - req.arrival)
        elif m and seq.last_token_time is not None:
            m.itl.observe(now - seq.last_token_time)
        seq.last_token_time = now
        finish = None
        stop_token = self.runner.is_stop_token(seq, token)
        text = "" if stop_token else seq.state.detok.add(token)
        if stop_token or seq.state.detok.stopped:
            finish = "stop"
        elif len(seq.output_ids) >= req.params.max_tokens or \
                seq.prompt_len + len(seq.output_ids) >= self.runner.max_model_len:
            finish = "length"
        if finish:
            text += seq.state.detok.flush()
        event = Event(token_ids=[token], text=text, logprobs=[info] if info else [], finish_reason=finish,
                      prompt_tokens=seq.prompt_len, completion_tokens=len(seq.output_ids), images=images)
        self._emit(req.request_id, event)
        if finish and release:
            self._release(seq)
            self._record_finish(seq, finish)
        return finish

    def _release(self, seq: Sequence) -> None:
        self._by_id.pop(seq.request.request_id, None)
        move = self.scheduler.remove(seq)
        if move:
            moved = self.scheduler.decoding[move[1]]
            self.runner.move(move[0], move[1], moved.length)
        seq.embeds = None

    def _fail(self, seq: Sequence, message: str, status: int = 500, etype: str = "server_error") -> None:
        self._release(seq)
        self._emit(seq.request.request_id, Event(finish_reason="error", error=message, error_status=status,
                                                 error_type=etype))
        self._record_finish(seq, "error", status="error")

    def _record_images(self, seq: Sequence, vision_seconds: float | None) -> None:
        m = self.metrics
        if not m:
            return
        if vision_seconds is not None:  # encoded inline (no vision thread)
            m.vision.observe(vision_seconds)
        for r in seq.state.images:
            m.image_tokens.labels("global").inc(r.global_tokens)
            m.image_tokens.labels("local_total").inc(r.local_tokens)
            m.image_tokens.labels("local_kept").inc(r.local_kept)

    def _record_finish(self, seq: Sequence, finish: str, status: str = "ok") -> None:
        m = self.metrics
        if not m:
            return
        m.requests.labels(status, finish).inc()
        if seq.prompt_len:
            m.prompt_tokens.inc(seq.prompt_len)
        m.generation_tokens.inc(len(seq.output_ids))
        if status == "ok":
            m.e2e.observe(time.monotonic() - seq.request.arrival)

    def _update_gauges(self) -> None:
        m = self.metrics
        if not m:
            return
        sched = self.scheduler
        m.running.set(sched.num_running)
        m.waiting.set(len(sched.waiting) + self.in_vision)
        used = sum(s.length for s in sched.decoding) + (sched.prefilling.prefilled if sched.prefilling else 0)
        m.kv_usage.set(used / (sched.num_slots * self.runner.max_model_len))
        m.decode_graphs.set(self.runner.graphs.num_graphs if self.runner.graphs else 0)
