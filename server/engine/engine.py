"""The engine: a thread that owns the model and runs plan -> execute -> apply steps, and the
async front (`EngineClient`) through which requests come in and their events go out.

Each step the scheduler plans (prompt chunks, then one batched decode), the executor runs the
plan on the model, and the engine applies the outcome: tokens to events, finished and failed
sequences out of the batch, and the step's numbers into `EngineStats`."""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from .executor import DecodeOutcome, FaultHook, PrefillOutcome, StepExecutor
from .interface import EngineDead
from .runner import ModelRunner
from .kv_blocks import BlockPool
from .scheduler import Scheduler, SequenceState, StepPlan
from .stopping import finish_reason
from .streams import RequestStream, StreamRegistry
from .types import CachedImage, EngineError, EngineRequest, EngineStats, ErrorKind, Event, FinishedRequest, ModelInfo
from .vision import FeatureBudget, VisionStage, name_os_thread
from .vision_cache import CacheMiss

log = logging.getLogger(__name__)

# One step's (request_id, Event) pairs and its stats, for detached requests (the engine process)
Deliver = Callable[[list[tuple[str, Event]], EngineStats], None]
StatsObserver = Callable[[EngineStats], None]


@dataclass
class _Add:
    request: EngineRequest


@dataclass
class _Abort:
    request_id: str


@dataclass
class _VisionDone:
    request: EngineRequest
    error: Exception | None


class Engine:
    """Continuous batching over a paged KV cache (implements `EngineClient`).

    Each step: admit waiting requests while blocks are free, run one prefill chunk of the sequence
    being prefilled (so running streams stall at most one chunk) -- or several short prompts whose
    total fits in one chunk -- then one batched decode forward for every decoding sequence.
    """

    def __init__(self, runner: ModelRunner, *, max_batch_size: int | None = None, prefill_chunk: int = 512,
                 prefix_caching: bool = True, info: ModelInfo | None = None, on_stats: StatsObserver | None = None,
                 vision_thread: bool = True, vision_nice: int = 0, vision_queue_bytes: int = 0,
                 vision_batch_views: int = 32, fault_hook: FaultHook | None = None):
        self.runner = runner
        self.info = info if info is not None else ModelInfo.of(runner.lm)
        pool = BlockPool(runner.num_blocks, runner.block_size, prefix_caching=prefix_caching)
        self.scheduler = Scheduler(max_batch_size=max_batch_size or runner.max_batch_size, pool=pool,
                                   prefill_chunk=prefill_chunk, key_generated=runner.llm.batch_invariant)
        self.executor = StepExecutor(runner, self.scheduler, fault_hook)
        self.prefill_chunk = prefill_chunk
        self.on_stats = on_stats
        # Where a step's events go: to each request's RequestStream on its event loop, or for
        # requests added with `submit_detached`, to `deliver` (the engine process hands them to
        # the API process, see `process.py`).
        self.deliver: Deliver | None = None
        self._streams = StreamRegistry(self.abort)
        self._detached: set[str] = set()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._by_id: dict[str, SequenceState] = {}
        self._outbox: list[tuple[str, Event]] = []
        self._stats = EngineStats()
        self._thread: threading.Thread | None = None
        self.vision = VisionStage(self.executor.encode, self._vision_done, wanted=self._wanted, nice=vision_nice,
                                  budget=FeatureBudget(vision_queue_bytes, self._wanted),
                                  batch_views=vision_batch_views) if vision_thread else None
        self._stop = threading.Event()
        self._alive = False
        # a detached request's new schema (the engine process's API side compiled it in its own
        # process) is compiled here, in order, before the request reaches the engine thread
        self._grammar_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slime-grammar")
        self.steps = 0

    @property
    def fault_hook(self) -> FaultHook | None:
        return self.executor.fault_hook

    @fault_hook.setter
    def fault_hook(self, hook: FaultHook | None) -> None:
        self.executor.fault_hook = hook

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="slime-engine", daemon=True)
        self._alive = True
        self._thread.start()
        if self.vision is not None:
            self.vision.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._grammar_pool.shutdown(wait=False, cancel_futures=True)
        self._stop.set()
        self._inbox.put(None)
        if self.vision is not None:
            self.vision.stop(timeout)
        if self._thread:
            self._thread.join(timeout)
        self._alive = False

    @property
    def alive(self) -> bool:
        return self._alive

    # -- the EngineClient interface (any thread) -------------------------------------------------
    def submit(self, request: EngineRequest) -> RequestStream:
        """Hand a request to the engine now; iterate the returned stream for its events. Closing
        the stream early (client gone) aborts the request and frees its blocks at the next step."""
        if not self._alive:
            raise EngineDead("the engine is not running")
        stream = self._streams.open(request.request_id)
        if not self._alive:  # stopped meanwhile: its last sweep may have missed this stream
            self._streams.discard(request.request_id)
            raise EngineDead("the engine is not running")
        self._inbox.put(_Add(request))
        return stream

    def submit_detached(self, request: EngineRequest) -> None:
        """Hand a request to the engine; its events go to `deliver`."""
        if not self._alive:
            raise EngineDead("the engine is not running")
        self._detached.add(request.request_id)
        if request.params.grammar is not None:  # compiled off the engine thread and off the caller's
            self._grammar_pool.submit(self._compile_then_add, request)
            return
        self._inbox.put(_Add(request))

    def _compile_then_add(self, request: EngineRequest) -> None:
        self.runner.compile_grammar(request)
        self._inbox.put(_Add(request))

    @property
    def num_requests(self) -> int:
        return len(self._streams) + len(self._detached)

    def cached_image(self, digest: str) -> CachedImage | None:
        cache = self.runner.vision_cache
        feats = cache.pin(digest) if cache is not None else None
        return None if feats is None else CachedImage(feats.grid)

    def abort(self, request_id: str) -> None:
        self._streams.discard(request_id)
        self._detached.discard(request_id)
        self._inbox.put(_Abort(request_id))

    def _wanted(self, request_id: str) -> bool:
        return request_id in self._streams or request_id in self._detached

    # -- events out --------------------------------------------------------------------------------
    def _emit(self, request_id: str, event: Event) -> None:
        """Queue an event; `_flush` hands a step's events on in one wake-up."""
        if self._wanted(request_id):
            self._outbox.append((request_id, event))

    def _flush(self) -> None:
        stats = self._take_stats()
        batch, self._outbox = self._outbox, []
        if self.deliver is not None:
            for request_id, event in batch:
                if event.finish_reason is not None:
                    self._detached.discard(request_id)
            self.deliver(batch, stats)
            return
        if batch:
            self._streams.dispatch(batch)
        if self.on_stats is not None:
            try:
                self.on_stats(stats)
            except Exception:  # noqa: BLE001 - a metrics bug must not stop the engine
                log.exception("the engine's stats observer failed")

    def _take_stats(self) -> EngineStats:
        stats, self._stats = self._stats, EngineStats()
        sched = self.scheduler
        stats.running = sched.num_running
        stats.waiting = len(sched.waiting) + (self.vision.pending if self.vision else 0)
        stats.kv_usage = sched.pool.num_used / sched.pool.capacity
        stats.kv_cached_blocks = sched.pool.num_cached
        stats.kv_blocks, stats.kv_block_size = sched.pool.capacity, sched.block_size
        stats.preemptions, sched.preempted = sched.preempted, 0
        stats.prefix_queried_tokens, sched.prefix_queried = sched.prefix_queried, 0
        stats.prefix_hit_tokens, sched.prefix_hits = sched.prefix_hits, 0
        stats.cuda_graphs = self.runner.graphs.num_graphs if self.runner.graphs else 0
        if self.vision is not None:
            stats.vision_features_bytes = self.vision.budget.held
            self.vision.budget.notify()  # a step may have started requests that held features
        return stats

    # -- the engine thread -------------------------------------------------------------------------
    def _loop(self) -> None:
        name_os_thread("slime-engine")
        try:
            broken = self._run()
            self._shut_down(EngineError(ErrorKind.UNAVAILABLE, "the engine stopped: the model fails every step")
                            if broken else EngineError(ErrorKind.UNAVAILABLE, "the server is shutting down"))
        except Exception:  # noqa: BLE001 - end every stream, then let the thread go
            log.exception("the engine loop died")
            self._alive = False
            self._end_all(EngineError(ErrorKind.UNAVAILABLE, "the engine stopped"))
        finally:
            self._alive = False

    def _shut_down(self, gone: EngineError) -> None:
        self._alive = False
        for seq in self.scheduler.decoding + self.scheduler.prefilling:
            self._fail(seq, gone)
        self.scheduler.waiting.clear()
        self._end_all(gone)

    def _end_all(self, error: EngineError) -> None:
        """Every request still registered (waiting, in the vision stage, running, not yet picked up)
        ends now with `error`, without touching the model (which may be what broke)."""
        self._outbox = [(rid, Event.failed(error.kind, error.message))
                        for rid in self._streams.ids() + list(self._detached)]
        self._flush()

    def _run(self) -> bool:
        """The step loop, until stopped (-> False) or the model fails every step (-> True: the
        engine is dead, /health says so, and a restart is the cure)."""
        self._flush()  # a first report: the gauges (the cache's size among them) before any request
        while not self._stop.is_set():
            idle = not self.scheduler.has_work
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
            if self.scheduler.has_work:
                try:
                    self.step()
                except Exception:  # noqa: BLE001 - a bug in step bookkeeping must not kill the loop
                    log.exception("engine step failed")
                    self._fail_running(EngineError(ErrorKind.MODEL_ERROR, "internal error in the engine step"))
            self._flush()
            if self.executor.broken:
                log.error("the model failed %d decode steps in a row: stopping the engine", self.executor.failed_steps)
                return True
        return False

    def _fail_running(self, error: EngineError) -> None:
        """Every admitted sequence fails (preempted ones too); the block pool starts afresh (the
        bookkeeping that failed cannot be trusted)."""
        sched = self.scheduler
        admitted = [s for s in sched.waiting if s.begun]
        for seq in sched.decoding + sched.prefilling + admitted:
            self._emit(seq.request.request_id, Event.failed(error.kind, error.message))
            self._record_finish(seq, "error", status="error")
        sched.waiting = type(sched.waiting)(s for s in sched.waiting if not s.begun)
        sched.reset()
        self._by_id.clear()

    def _handle(self, item) -> None:
        if item is None:  # stop's wake-up
            return
        if isinstance(item, _Add):
            if not self._wanted(item.request.request_id):  # consumer already gone
                self._stats.finished.append(FinishedRequest("aborted", "abort", 0, 0, None))
                return
            if self.vision is not None and item.request.images:
                self.vision.submit(item.request)
            else:
                self.scheduler.add(item.request)
        elif isinstance(item, _VisionDone):
            self.vision.pending -= 1  # type: ignore[union-attr]
            req, error = item.request, item.error
            if not self._wanted(req.request_id):  # aborted in the vision stage
                self._stats.finished.append(FinishedRequest("aborted", "abort", 0, 0, None))
                return
            if error is not None:
                kind = ErrorKind.RETRY if isinstance(error, CacheMiss) else ErrorKind.MODEL_ERROR
                msg = str(error) if isinstance(error, CacheMiss) else "model error during vision encoding"
                self._emit(req.request_id, Event.failed(kind, msg))
                self._stats.finished.append(FinishedRequest("error", "error", 0, 0, None))
                return
            self._stats.vision_seconds.append(req.vision_seconds)
            self.scheduler.add(req)
        elif isinstance(item, _Abort):
            dropped = self.scheduler.drop_waiting(item.request_id)
            if dropped is not None:  # not admitted yet, or preempted
                self._by_id.pop(item.request_id, None)
                dropped.embeds = None
                self._stats.finished.append(FinishedRequest("aborted", "abort", dropped.prompt_len,
                                                            len(dropped.output_ids), None))
                return
            seq = self._by_id.get(item.request_id)
            if seq is not None:
                self._release(seq)
                self._record_finish(seq, "abort", status="aborted")

    def _vision_done(self, request: EngineRequest, error: Exception | None) -> None:
        self._inbox.put(_VisionDone(request, error))

    def step(self) -> None:
        self.steps += 1
        plan = self.scheduler.schedule(self.prefill_chunk)
        self._register(plan)
        self.apply(plan, *self._execute(plan))

    def _execute(self, plan: StepPlan) -> tuple[list[PrefillOutcome], list[DecodeOutcome]]:
        out = self.executor.execute(plan)
        return out.prefills, out.decodes

    def _register(self, plan: StepPlan) -> None:
        now = time.monotonic()
        for seq in plan.prefills:
            if seq.request.request_id not in self._by_id:
                self._by_id[seq.request.request_id] = seq
                self._stats.queue_time.append(now - seq.request.arrival)

    # -- applying a step's outcome ---------------------------------------------------------------
    def apply(self, plan: StepPlan, prefills: list[PrefillOutcome], decodes: list[DecodeOutcome]) -> None:
        """Decoded tokens first, then finished and failed sequences leave (releasing their blocks),
        then prompts that completed join the batch with their first token."""
        if decodes:
            self._stats.batch_sizes.append(len(decodes))
        finished, failed = [], []
        for out in decodes:
            if out.error is not None:
                failed.append((out.seq, out.error))
            elif out.token is not None:
                try:
                    finish = self._append(out.seq, out.token, out.info)
                except Exception:  # noqa: BLE001 - e.g. detokenising: this sequence only
                    log.exception("finishing the step failed for %s", out.seq.request.request_id)
                    failed.append((out.seq, EngineError(ErrorKind.MODEL_ERROR, "model error during decoding")))
                    continue
                if finish:
                    finished.append((out.seq, finish))
        for seq, finish in finished:
            self._release(seq)
            self._record_finish(seq, finish)
        for seq, error in failed:
            self._fail(seq, error)
        for out in prefills:
            self._apply_prefill(out)

    def _apply_prefill(self, out: PrefillOutcome) -> None:
        seq = out.seq
        if out.error is not None:
            self._fail(seq, out.error)
            return
        if out.begun:
            self._record_images(seq, out.vision_seconds)
        if not out.complete:  # more chunks to come
            return
        self.scheduler.finish_prefill(seq)
        if out.first is None:  # computed again after preemption: it has its tokens
            return
        self._fork_siblings(seq)
        self._first_token(seq, *out.first)

    def _first_token(self, seq: SequenceState, token: int, info) -> None:
        try:
            finish = self._append(seq, token, info, images=seq.state.images)
        except Exception:  # noqa: BLE001
            log.exception("finishing the prefill failed for %s", seq.request.request_id)
            self._fail(seq, EngineError(ErrorKind.MODEL_ERROR, "model error during prefill"))
            return
        if finish:
            self._release(seq)
            self._record_finish(seq, finish)

    def _fork_siblings(self, parent: SequenceState) -> None:
        """The other choices of `parent`'s request that are waiting start decoding on its prompt's
        blocks, each sampling its first token from the same last logits: the numbers they would
        have computed themselves, without computing them again."""
        siblings = self.scheduler.waiting_siblings(parent)
        now = time.monotonic()
        for child in siblings:
            self._by_id[child.request.request_id] = child
            self._stats.queue_time.append(now - child.request.arrival)
            try:
                first = self.executor.fork(parent, child)
            except Exception:  # noqa: BLE001 - this choice only
                log.exception("forking %s failed", child.request.request_id)
                self.scheduler.drop_waiting(child.request.request_id)
                self._by_id.pop(child.request.request_id, None)
                self._emit(child.request.request_id, Event.failed(ErrorKind.MODEL_ERROR, "model error during prefill"))
                self._record_finish(child, "error", status="error")
                continue
            self.scheduler.fork(parent, child)
            self._first_token(child, *first)
        parent.prompt_logits = None

    def _append(self, seq: SequenceState, token: int, info, images=None) -> str | None:
        """Record a sampled token and emit its event; returns the finish reason, if any (the
        caller frees its blocks)."""
        now = time.monotonic()
        req = seq.request
        seq.output_ids.append(token)
        if seq.first_token_time is None:
            seq.first_token_time = now
            self._stats.ttft.append(now - req.arrival)
        elif seq.last_token_time is not None:
            self._stats.itl.append(now - seq.last_token_time)
        seq.last_token_time = now
        grammar_done = self.runner.advance_grammar(seq, token)
        # a complete document ends with the grammar's stop token (EOS), also under ignore_eos
        stop_token = self.runner.is_stop_token(seq, token) or (grammar_done and token in self.runner.eos)
        detok = seq.state.detok
        text = "" if stop_token else detok.add(token)
        finish = finish_reason(stop_token=stop_token or grammar_done, stop_string=detok.stopped,
                               generated=len(seq.output_ids),
                               max_tokens=req.params.max_tokens, length=seq.prompt_len + len(seq.output_ids),
                               max_model_len=self.runner.max_model_len)
        if finish:
            text += detok.flush()
        self._emit(req.request_id, Event(token_ids=[token], text=text, logprobs=[info] if info else [],
                                         finish_reason=finish, prompt_tokens=seq.prompt_len,
                                         completion_tokens=len(seq.output_ids), images=images))
        return finish

    def _release(self, seq: SequenceState) -> None:
        self._by_id.pop(seq.request.request_id, None)
        self.scheduler.remove(seq)
        seq.embeds = None

    def _fail(self, seq: SequenceState, error: EngineError) -> None:
        self._release(seq)
        self._emit(seq.request.request_id, Event.failed(error.kind, error.message))
        self._record_finish(seq, "error", status="error")

    def _record_images(self, seq: SequenceState, vision_seconds: float | None) -> None:
        stats = self._stats
        if vision_seconds is not None:  # encoded inline (no vision thread)
            stats.vision_seconds.append(vision_seconds)
        tokens = stats.image_tokens
        for r in seq.state.images:
            tokens["global"] = tokens.get("global", 0) + r.global_tokens
            tokens["local_total"] = tokens.get("local_total", 0) + r.local_tokens
            tokens["local_kept"] = tokens.get("local_kept", 0) + r.local_kept

    def _record_finish(self, seq: SequenceState, finish: str, status: str = "ok") -> None:
        e2e = time.monotonic() - seq.request.arrival if status == "ok" else None
        self._stats.finished.append(FinishedRequest(status, finish, seq.prompt_len, len(seq.output_ids), e2e))
