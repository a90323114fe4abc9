"""The engine core: a thread that owns the model and runs schedule -> execute -> update steps.

The scheduler plans (prompt chunks, forks, one batched decode), the executor runs the plan, the
scheduler applies its output (the only writer of counters and blocks), the output processor turns
new tokens into events. Each step's events and stats go to one sink: the in-process client's
streams (`client.Engine`) or the engine process's pipe (`process.py`)."""

from __future__ import annotations

import logging
import threading
import time

from .executor import FaultHook, StepExecutor
from .interface import EngineDead
from .kv_blocks import BlockPool
from .inbox import Abort, Add, Inbox, Sink, VisionDone
from .output import OutputProcessor
from .runner import ModelRunner
from .scheduler import Scheduler
from .sequence import SequenceState
from .stats import StepStats
from .types import CachedImage, EngineError, EngineRequest, EngineStats, ErrorKind, Event, FinishedRequest, ModelInfo
from .vision import FeatureBudget, VisionStage, name_os_thread
from .vision_cache import CacheMiss

log = logging.getLogger(__name__)


class EngineCore:
    """Continuous batching over a paged KV cache: a step runs prompt chunks (running streams stall
    at most one chunk) and one batched decode for every decoding sequence."""

    def __init__(self, runner: ModelRunner, *, sink: Sink, max_batch_size: int | None = None, prefill_chunk: int = 512,
                 prefix_caching: bool = True, info: ModelInfo | None = None, vision_thread: bool = True,
                 vision_nice: int = 0, vision_queue_bytes: int = 0, vision_batch_views: int = 32,
                 fault_hook: FaultHook | None = None, compile_grammars: bool = False):
        self.runner = runner
        self.info = info if info is not None else ModelInfo.of(runner.lm)
        pool = BlockPool(runner.num_blocks, runner.block_size, prefix_caching=prefix_caching)
        # chunks end on block boundaries (the flash backend's 256-position blocks can outgrow one)
        self.prefill_chunk = prefill_chunk = -(-prefill_chunk // runner.block_size) * runner.block_size
        self.scheduler = Scheduler(max_batch_size=max_batch_size or runner.max_batch_size, pool=pool,
                                   prefill_chunk=prefill_chunk, key_generated=runner.llm.batch_invariant)
        self.executor = StepExecutor(runner, fault_hook)
        self.output = OutputProcessor(runner.lm.tokenizer, runner.eos, runner.max_model_len, self._emit)
        self.sink = sink
        self._live: set[str] = set()  # submitted, not finished or aborted
        self._inbox = Inbox(runner.compile_grammar if compile_grammars else None)
        self._outbox: list[tuple[str, Event]] = []
        self._stats = EngineStats()
        self._thread: threading.Thread | None = None
        self.vision = VisionStage(self.executor.encode, self._vision_done, wanted=self._wanted, nice=vision_nice,
                                  budget=FeatureBudget(vision_queue_bytes, self._wanted),
                                  batch_views=vision_batch_views) if vision_thread else None
        self._stop = threading.Event()
        self._alive = False
        self._handlers = {Add: self._on_add, VisionDone: self._on_vision_done, Abort: self._on_abort}
        self.steps = 0

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="slime-engine", daemon=True)
        self._alive = True
        self._thread.start()
        if self.vision is not None:
            self.vision.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._inbox.close()
        if self.vision is not None:
            self.vision.stop(timeout)
        if self._thread:
            self._thread.join(timeout)
        self._alive = False

    def __enter__(self) -> "EngineCore":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def alive(self) -> bool:
        return self._alive

    # -- requests in (any thread) ----------------------------------------------------------------
    def submit(self, request: EngineRequest) -> None:
        """Hand a request to the engine; its events go to the sink."""
        if not self._alive:
            raise EngineDead("the engine is not running")
        self._live.add(request.request_id)
        self._inbox.add(request)  # a new grammar compiled first, off this thread (engine process)

    def abort(self, request_id: str) -> None:
        self._live.discard(request_id)
        self._inbox.put(Abort(request_id))

    @property
    def num_requests(self) -> int:
        return len(self._live)

    def cached_image(self, digest: str) -> CachedImage | None:
        cache = self.runner.vision_cache
        feats = cache.pin(digest) if cache is not None else None
        return None if feats is None else CachedImage(feats.grid)

    def _wanted(self, request_id: str) -> bool:
        return request_id in self._live

    def _vision_done(self, request: EngineRequest, error: Exception | None) -> None:
        self._inbox.put(VisionDone(request, error))

    # -- events out --------------------------------------------------------------------------------
    def _emit(self, request_id: str, event: Event) -> None:
        """Queue an event; `_flush` hands a step's events on in one wake-up."""
        if self._wanted(request_id):
            self._outbox.append((request_id, event))
            if event.finish_reason is not None:
                self._live.discard(request_id)

    def _flush(self) -> None:
        stats, self._stats = StepStats.gauges(self._stats, self.scheduler, self.runner, self.vision), EngineStats()
        batch, self._outbox = self._outbox, []
        self.sink(batch, stats)

    # -- the engine thread -------------------------------------------------------------------------
    def _loop(self) -> None:
        name_os_thread("slime-engine")
        try:
            broken = self._run()
            self._end_all(EngineError(ErrorKind.UNAVAILABLE, "the engine stopped: the model fails every step")
                          if broken else EngineError(ErrorKind.UNAVAILABLE, "the server is shutting down"))
        except Exception:  # noqa: BLE001 - end every stream, then let the thread go
            log.exception("the engine loop died")
            self._alive = False
            self._end_all(EngineError(ErrorKind.UNAVAILABLE, "the engine stopped"))
        finally:
            self._alive = False

    def _end_all(self, error: EngineError) -> None:
        """Every request still here (waiting, in the vision stage, running, not yet picked up) ends
        now with `error`, without touching the model (which may be what broke)."""
        self._alive = False
        self._outbox = [(rid, Event.failed(error.kind, error.message)) for rid in list(self._live)]
        self._live.clear()
        self._flush()

    def _run(self) -> bool:
        """The step loop, until stopped (-> False) or the model fails every step (-> True: the
        engine is dead, /health says so, and a restart is the cure)."""
        self._flush()  # a first report: the gauges (the cache's size among them) before any request
        while not self._stop.is_set():
            for item in self._inbox.drain(0 if self.scheduler.has_work else 0.5):
                self._handlers[type(item)](item)
            if self.scheduler.has_work:
                try:
                    self.step()
                except Exception:  # noqa: BLE001 - a bug in step bookkeeping must not kill the loop
                    log.exception("engine step failed")
                    self._fail_admitted(EngineError(ErrorKind.MODEL_ERROR, "internal error in the engine step"))
            self._flush()
            if self.executor.broken:
                log.error("the model failed %d decode steps in a row: stopping the engine", self.executor.failed_steps)
                return True
        return False

    def _fail_admitted(self, error: EngineError) -> None:
        """Every admitted sequence fails (preempted ones too); the block pool starts afresh (the
        bookkeeping that failed cannot be trusted)."""
        for seq in self.scheduler.reset():
            self._emit(seq.request.request_id, Event.failed(error.kind, error.message))
            self.output.finished(seq, "error", self._stats, status="error")

    # -- intake (the engine thread) ----------------------------------------------------------------
    def _on_add(self, item: Add) -> None:
        request = item.request
        if not self._wanted(request.request_id):  # consumer already gone
            self._stats.finished.append(FinishedRequest("aborted", "abort", 0, 0, None))
        elif self.vision is not None and request.images:
            self.vision.submit(request)
        else:
            self.scheduler.add(SequenceState(request))

    def _on_vision_done(self, item: VisionDone) -> None:
        self.vision.pending -= 1  # type: ignore[union-attr]
        request, error = item.request, item.error
        if not self._wanted(request.request_id):  # aborted in the vision stage
            self._stats.finished.append(FinishedRequest("aborted", "abort", 0, 0, None))
        elif error is not None:
            cache_miss = isinstance(error, CacheMiss)
            self._emit(request.request_id, Event.failed(ErrorKind.RETRY if cache_miss else ErrorKind.MODEL_ERROR,
                                                        str(error) if cache_miss else "model error during vision encoding"))
            self._stats.finished.append(FinishedRequest("error", "error", 0, 0, None))
        else:
            self._stats.vision_seconds.append(request.vision_seconds)
            self.scheduler.add(SequenceState(request))

    def _on_abort(self, item: Abort) -> None:
        seq = self.scheduler.get(item.request_id)
        if seq is not None:
            self.scheduler.remove(seq)
            self.output.finished(seq, "abort", self._stats, status="aborted")

    def _prepare(self, seq: SequenceState) -> None:
        """Selection and embedding before the scheduler plans `seq`, and the other choices of its
        request waiting (they share its prompt); a failure fails that request."""
        group = self.scheduler.group(seq.request.group) if seq.request.group is not None else []
        for s in [seq] + [s for s in group if not s.prepared and s is not seq]:
            outcome = self.executor.prepare(s, like=None if s is seq else seq)
            if isinstance(outcome, EngineError):
                self._fail(s, outcome)
                if s is seq:
                    return
            else:
                self.output.start(s)
                StepStats.images(self._stats, s.state.images, outcome)

    # -- one step ----------------------------------------------------------------------------------
    def step(self) -> None:
        self.steps += 1
        for seq in self.scheduler.to_prepare(self.prefill_chunk):
            if not seq.prepared:  # a sibling may have been prepared with it
                self._prepare(seq)
        plan = self.scheduler.schedule(self.prefill_chunk)
        self._stats.queue_time += [time.monotonic() - s.request.arrival for s in plan.started]  # forks too
        output = self.executor.execute(plan)
        if plan.decodes:
            self._stats.batch_sizes.append(len(plan.decodes))
        update = self.scheduler.update_from_output(plan, output)
        for seq, error in update.failed:
            self._report_failure(seq, error)
        finished, failed = self.output.process(update.tokens, self._stats)
        for seq, finish in finished:
            self.scheduler.remove(seq)
            self.output.finished(seq, finish, self._stats)
        for seq, error in failed:
            self._fail(seq, error)

    def _fail(self, seq: SequenceState, error: EngineError) -> None:
        self.scheduler.remove(seq)
        self._report_failure(seq, error)

    def _report_failure(self, seq: SequenceState, error: EngineError) -> None:
        self._emit(seq.request.request_id, Event.failed(error.kind, error.message))
        self.output.finished(seq, "error", self._stats, status="error")
