"""Runs a planned step on the model and reports what happened, keeping each failure to the
sequences that cause it. It changes no sequence's counters or blocks (the scheduler applies
its `StepOutput`).

A prompt chunk that fails fails its sequence. A decode forward that fails is bisected over
prefixes of the batch to find the sequence whose presence breaks it; sampling that fails is
redone row by row (generators restored first, so seeded requests draw as if nothing happened);
the rest decode on."""

from __future__ import annotations

import logging
from typing import Callable

from .runner import ModelRunner, PromptTooLong
from .sequence import SequenceState
from .step import ChunkOutput, DecodeOutput, PromptChunk, Sampled, StepOutput, StepPlan
from .types import EngineError, EngineRequest, ErrorKind
from .vision_cache import CacheMiss

log = logging.getLogger(__name__)

# After this many decode steps in a row that fail (a culprit found or not), the model is taken to
# be broken for everyone (a dead device fails every forward, and bisection would blame one
# innocent request per step): the batch fails and the engine stops, so that /health says so.
MAX_FAILED_STEPS = 3

FaultHook = Callable[[str, list[EngineRequest]], None]

PREFILL_FAILED = EngineError(ErrorKind.MODEL_ERROR, "model error during prefill")
DECODE_FAILED = EngineError(ErrorKind.MODEL_ERROR, "model error during decoding")


class StepExecutor:
    def __init__(self, runner: ModelRunner, fault_hook: FaultHook | None = None):
        self.runner = runner
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

    def prepare(self, seq: SequenceState, like: SequenceState | None = None) -> float | None | EngineError:
        """`runner.prepare` (see there) -> seconds spent encoding inline, or what failed it."""
        try:
            return self.runner.prepare(seq, like=like)
        except CacheMiss as e:
            return EngineError(ErrorKind.RETRY, str(e))
        except PromptTooLong as e:
            return EngineError(ErrorKind.INVALID_REQUEST, str(e))
        except Exception:  # noqa: BLE001 - fails this request only
            log.exception("preparing %s failed", seq.request.request_id)
            return PREFILL_FAILED

    def execute(self, plan: StepPlan) -> StepOutput:
        self.runner.copy_blocks(plan.copies)  # before anything writes to the copies
        chunks = [self._chunk(chunk) for chunk in plan.chunks]
        return StepOutput(chunks, self._decode(plan.decodes) if plan.decodes else [])

    # -- prefill ---------------------------------------------------------------------------------
    def _chunk(self, chunk: PromptChunk) -> ChunkOutput:
        seq, out = chunk.seq, ChunkOutput()
        try:
            if chunk.first:
                self.inject("prefill", [seq.request])
            logits = self.runner.prefill_chunk(seq, chunk.start, chunk.end, sample=chunk.samples)  # [1, V] | None
            if logits is not None:
                spare = logits.clone() if chunk.forks else None  # sampling may change the logits it is given
                out.first = self._sample_one(logits, seq)
                out.forks = [self._fork(spare, child) for child in chunk.forks]
        except CacheMiss as e:
            out.error = EngineError(ErrorKind.RETRY, str(e))
        except Exception:  # noqa: BLE001 - fails this request only
            log.exception("prefill failed for %s", seq.request.request_id)
            out.error = PREFILL_FAILED
        return out

    def _sample_one(self, logits, seq: SequenceState) -> Sampled:
        tokens, infos = self.runner.sample(logits, [seq])
        return tokens[0], infos[0]

    def _fork(self, logits, child: SequenceState) -> Sampled | EngineError:
        """A sibling choice's first token, from its parent's last prompt logits."""
        try:
            self.inject("prefill", [child.request])
            return self._sample_one(logits, child)
        except Exception:  # noqa: BLE001 - this choice only
            log.exception("forking %s failed", child.request.request_id)
            return PREFILL_FAILED

    # -- decode ----------------------------------------------------------------------------------
    def _forward(self, seqs: list[SequenceState]):
        self.inject("decode", [s.request for s in seqs])
        return self.runner.forward(seqs)

    def _sample(self, logits, seqs: list[SequenceState]):
        self.inject("sample", [s.request for s in seqs])
        return self.runner.sample(logits, seqs)

    def _decode(self, seqs: list[SequenceState]) -> list[DecodeOutput]:
        try:
            logits = self._forward(seqs)  # [B, V]
        except Exception:  # noqa: BLE001 - find who caused it; the others decode again next step
            log.exception("decode forward failed for a batch of %d", len(seqs))
            self.failed_steps += 1
            if self.broken:
                return [DecodeOutput(error=DECODE_FAILED) for _ in seqs]
            culprit = self._forward_culprit(seqs)  # None: transient; all decode again next step
            return [DecodeOutput(error=DECODE_FAILED if s is culprit else None) for s in seqs]
        self.failed_steps = 0
        # Rows that replayed a position lost to preemption sample nothing: their logits are for a
        # token they already have. The others sample the next one.
        live = [i for i, s in enumerate(seqs) if not s.replaying]
        outs = [DecodeOutput(ran=True) for _ in seqs]
        if live:
            rows = live if len(live) < len(seqs) else slice(None)
            for i, (token, info, error) in zip(live, self._sample_rows(logits[rows], [seqs[i] for i in live])):
                outs[i].token, outs[i].info, outs[i].error = token, info, error
        return outs

    def _sample_rows(self, logits, seqs: list[SequenceState]) -> list[tuple[int | None, object, EngineError | None]]:
        rng = self.runner.rng_states(seqs)
        try:
            tokens, infos = self._sample(logits, seqs)
            return [(t, i, None) for t, i in zip(tokens, infos)]
        except Exception:  # noqa: BLE001 - sample each row alone: only the failing rows fail
            log.exception("sampling failed for a batch of %d; sampling row by row", len(seqs))
        self.runner.restore_rng_states(seqs, rng)
        outs = []
        for row, s in enumerate(seqs):
            try:
                tokens, infos = self._sample(logits[row:row + 1], [s])
                outs.append((tokens[0], infos[0], None))
            except Exception:  # noqa: BLE001
                log.exception("sampling failed for %s", s.request.request_id)
                outs.append((None, None, DECODE_FAILED))
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
