"""Runs a planned step on the model, keeping each failure to the sequences that cause it.

Prompt chunks fail one sequence each; a chunk runs only when the blocks it writes are free
(its sequence waits otherwise). A decode forward that fails is bisected over prefixes of the
batch to find the sequence whose presence breaks it; sampling that fails is redone row
by row (generators restored first, so seeded requests draw as if nothing happened); the rest
decode on."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

from .runner import ModelRunner, PromptTooLong
from .scheduler import Scheduler, SequenceState, StepPlan
from .types import EngineError, EngineRequest, ErrorKind, TokenLogprob
from .vision_cache import CacheMiss

log = logging.getLogger(__name__)

# After this many decode steps in a row that fail (a culprit found or not), the model is taken to
# be broken for everyone (a dead device fails every forward, and bisection would blame one
# innocent request per step): the batch fails and the engine stops, so that /health says so.
MAX_FAILED_STEPS = 3

FaultHook = Callable[[str, list[EngineRequest]], None]


@dataclass
class PrefillOutcome:
    seq: SequenceState
    ran: int = 0  # prompt positions run
    complete: bool = False  # the prompt is all in the cache: the sequence decodes from the next step
    begun: bool = False  # selection and embedding ran in this step
    vision_seconds: float | None = None  # when the images were encoded inline (no vision thread)
    first: tuple[int, TokenLogprob | None] | None = None  # the first token, once the prompt is all in
    error: EngineError | None = None


@dataclass
class DecodeOutcome:
    seq: SequenceState
    token: int | None = None  # None: no token this step (failed, replaying, or to retry next step)
    info: TokenLogprob | None = None
    error: EngineError | None = None


@dataclass
class StepOutputs:
    prefills: list[PrefillOutcome]
    decodes: list[DecodeOutcome]


class StepExecutor:
    def __init__(self, runner: ModelRunner, scheduler: Scheduler, fault_hook: FaultHook | None = None):
        self.runner = runner
        self.blocks = scheduler  # prefix matching, block reservation and keying for prompt chunks
        # Tests: f(stage, requests) inside each model stage ("vision", "prefill", "decode",
        # "sample") with the requests it serves; what it raises fails like a model error.
        self.fault_hook = fault_hook
        self.failed_steps = 0  # consecutive decode steps whose forward failed

    @property
    def broken(self) -> bool:
        return self.failed_steps >= MAX_FAILED_STEPS

    def inject(self, stage: str, requests: list[EngineRequest]) -> None:
        if self.fault_hook is not None:
            self.fault_hook(stage, requests)

    def encode(self, requests: list[EngineRequest]) -> None:
        """The vision stage's work for a batch of requests (its own thread): sets their features."""
        self.inject("vision", requests)
        for request, feats in zip(requests, self.runner.encode_many([r.images for r in requests])):
            request.features = feats

    def execute(self, plan: StepPlan) -> StepOutputs:
        self.runner.copy_blocks(plan.copies)  # before anything writes to the copies
        prefills, budget = [], plan.prefill_budget
        for seq in plan.prefills:
            if budget <= 0:
                break
            out = self._prefill(seq, budget)
            budget -= out.ran
            prefills.append(out)
        decodes = self._decode(plan.decodes) if plan.decodes else []
        return StepOutputs(prefills, decodes)

    # -- prefill ---------------------------------------------------------------------------------
    def _prefill(self, seq: SequenceState, budget: int) -> PrefillOutcome:
        out = PrefillOutcome(seq)
        before = seq.computed
        try:
            if not seq.begun:
                out.begun = True
                self.inject("prefill", [seq.request])
                if seq.request.features is None and seq.request.images:  # no vision thread: encode here
                    t0 = time.perf_counter()
                    seq.request.features = self.runner.encode(seq.request.images)
                    out.vision_seconds = time.perf_counter() - t0
                self.runner.begin(seq)
                self.blocks.match_prefix(seq)
                before = seq.computed  # reused positions cost the step nothing
            end = min(seq.prompt_len, seq.computed + budget)
            if not self.blocks.reserve(seq, end):
                return out  # no blocks free for this chunk: the sequence waits a step
            out.first = self.runner.prefill_chunk(seq, end)
            out.complete = seq.computed >= seq.prompt_len
            self.blocks.commit(seq)
        except CacheMiss as e:
            out.error = EngineError(ErrorKind.RETRY, str(e))
        except PromptTooLong as e:
            out.error = EngineError(ErrorKind.INVALID_REQUEST, str(e))
        except Exception:  # noqa: BLE001 - fails this request only
            log.exception("prefill failed for %s", seq.request.request_id)
            out.error = EngineError(ErrorKind.MODEL_ERROR, "model error during prefill")
        out.ran = seq.computed - before
        return out

    def fork(self, parent: SequenceState, child: SequenceState) -> tuple[int, TokenLogprob | None]:
        """A sibling choice's state and first token, from `parent`'s prompt (see Engine)."""
        self.inject("prefill", [child.request])
        return self.runner.fork(parent, child)

    # -- decode ----------------------------------------------------------------------------------
    def _forward(self, seqs: list[SequenceState]):
        self.inject("decode", [s.request for s in seqs])
        return self.runner.forward(seqs)

    def _sample(self, logits, seqs: list[SequenceState]):
        self.inject("sample", [s.request for s in seqs])
        return self.runner.sample(logits, seqs)

    def _decode(self, seqs: list[SequenceState]) -> list[DecodeOutcome]:
        failed = EngineError(ErrorKind.MODEL_ERROR, "model error during decoding")
        try:
            logits = self._forward(seqs)  # [B, V]
        except Exception:  # noqa: BLE001 - find who caused it; the others decode again next step
            log.exception("decode forward failed for a batch of %d", len(seqs))
            self.failed_steps += 1
            if self.broken:
                return [DecodeOutcome(s, error=failed) for s in seqs]
            culprit = self._forward_culprit(seqs)  # None: transient; all decode again next step
            return [DecodeOutcome(s, error=failed if s is culprit else None) for s in seqs]
        self.failed_steps = 0
        # Rows that replayed a position lost to preemption sample nothing: their logits are for a
        # token they already have. The others sample the next one.
        live = [i for i, s in enumerate(seqs) if not s.replaying]
        for s in seqs:
            s.computed += 1
            self.blocks.commit(s)
        outs = {i: DecodeOutcome(s) for i, s in enumerate(seqs)}
        if live:
            rows = live if len(live) < len(seqs) else slice(None)
            outs.update(self._sample_rows(logits[rows], [seqs[i] for i in live], live, failed))
        return [outs[i] for i in range(len(seqs))]

    def _sample_rows(self, logits, seqs: list[SequenceState], index: list[int],
                     failed: EngineError) -> dict[int, DecodeOutcome]:
        rng = self.runner.rng_states(seqs)
        try:
            tokens, infos = self._sample(logits, seqs)
            return {j: DecodeOutcome(s, t, i) for j, s, t, i in zip(index, seqs, tokens, infos)}
        except Exception:  # noqa: BLE001 - sample each row alone: only the failing rows fail
            log.exception("sampling failed for a batch of %d; sampling row by row", len(seqs))
        self.runner.restore_rng_states(seqs, rng)
        outs = {}
        for row, (j, s) in enumerate(zip(index, seqs)):
            try:
                tokens, infos = self._sample(logits[row:row + 1], [s])
                outs[j] = DecodeOutcome(s, tokens[0], infos[0])
            except Exception:  # noqa: BLE001
                log.exception("sampling failed for %s", s.request.request_id)
                outs[j] = DecodeOutcome(s, error=failed)
        return outs

    def _forward_culprit(self, seqs: list[SequenceState]) -> SequenceState | None:
        """The sequence whose presence makes the decode forward fail: the last of the shortest
        failing prefix of the batch, found by bisection. A forward rewrites the same cache entries
        a later successful one will, and samples nothing.
        None when no prefix fails again (a transient failure)."""
        def fails(k: int) -> bool:
            try:
                self._forward(seqs[:k])
                return False
            except Exception:  # noqa: BLE001
                return True

        lo, hi = 1, len(seqs)  # the smallest failing k lies in [lo, hi]
        while lo < hi:
            mid = (lo + hi) // 2
            if fails(mid):
                hi = mid
            else:
                lo = mid + 1
        return seqs[lo - 1] if fails(lo) else None
