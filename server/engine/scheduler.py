"""Which requests run and what each step does (pure Python, no torch).

A bounded waiting queue, a fixed pool of KV-cache slots, and the rule that decoding sequences
occupy slots 0..B-1 (a decode step reads the cache as one view). `schedule` plans a step;
`finish_prefill` and `remove` apply its outcome and say which cache rows must move."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from .types import EngineRequest


@dataclass
class SequenceState:
    """One admitted request in the engine."""

    request: EngineRequest
    slot: int = -1
    prompt_len: int = 0  # exact, known after image selection (0 before)
    prefilled: int = 0  # prompt positions already in the cache
    embeds: Any = None  # prompt embeddings `[T, D]` while prefilling
    output_ids: list[int] = field(default_factory=list)
    state: Any = None  # runner-side sampling / detokenizer state
    first_token_time: float | None = None
    last_token_time: float | None = None
    scheduled_time: float | None = None

    @property
    def begun(self) -> bool:
        """Selection and prompt embedding done (prompt_len known)."""
        return self.state is not None

    @property
    def length(self) -> int:
        """Positions in the cache (prompt + generated tokens already fed back)."""
        return self.prefilled + max(0, len(self.output_ids) - 1)

    @property
    def prompt_left(self) -> int:
        """Prompt positions still to prefill (an upper bound before admission)."""
        return (self.prompt_len if self.begun else self.request.max_prompt_tokens) - self.prefilled


@dataclass
class StepPlan:
    """One engine step: prompt chunks to run (in order, sharing `prefill_budget` positions), then
    one batched decode of `decodes` (sequence i in slot i)."""

    prefills: list[SequenceState]
    decodes: list[SequenceState]
    prefill_budget: int

    @property
    def empty(self) -> bool:
        return not self.prefills and not self.decodes


class Scheduler:
    """Admission never over-commits the cache: a slot holds `max_model_len` positions and a
    request is admitted only with a free slot."""

    def __init__(self, *, num_slots: int):
        self.num_slots = num_slots
        self.waiting: deque[EngineRequest] = deque()
        self.decoding: list[SequenceState] = []  # decoding[i].slot == i
        self.prefilling: list[SequenceState] = []  # admitted, prompt not all in the cache yet
        self._free = set(range(num_slots))

    @property
    def num_running(self) -> int:
        return len(self.decoding) + len(self.prefilling)

    @property
    def num_free_slots(self) -> int:
        return len(self._free)

    @property
    def has_work(self) -> bool:
        return bool(self.decoding or self.prefilling or self.waiting)

    def add(self, request: EngineRequest) -> None:
        self.waiting.append(request)

    def schedule(self, prefill_budget: int) -> StepPlan:
        """Prompt work first: the sequence being prefilled (one chunk if it does not fit), then
        further waiting prompts while each surely fits whole in what is left of the budget (a
        prompt's chunks never depend on what else was admitted: same numbers). Then every
        decoding sequence."""
        prefills = list(self.prefilling)
        if not prefills:  # a new prompt starts even if only its first chunk fits
            seq = self._admit()
            prefills += [seq] if seq is not None else []
        budget = prefill_budget - sum(s.prompt_left for s in prefills)
        while budget > 0 and self.waiting and self.waiting[0].max_prompt_tokens <= budget:
            seq = self._admit()
            if seq is None:  # no free slot
                break
            prefills.append(seq)
            budget -= seq.prompt_left
        return StepPlan(prefills, list(self.decoding), prefill_budget)

    def _admit(self) -> SequenceState | None:
        if not self.waiting or not self._free:
            return None
        # Above the batch and above every prompt admitted before it: prompts complete in order,
        # each into slot len(decoding), which is then free (or its own). Usually it is the slot
        # it will decode in, so no move.
        floor = max([len(self.decoding)] + [s.slot + 1 for s in self.prefilling])
        above = [slot for slot in self._free if slot >= floor]
        if not above:  # wait for the earlier prompts to complete
            return None
        slot = min(above)
        self._free.discard(slot)
        seq = SequenceState(self.waiting.popleft(), slot=slot)
        self.prefilling.append(seq)
        return seq

    def finish_prefill(self, seq: SequenceState) -> tuple[int, int] | None:
        """Move a fully prefilled sequence into the decode batch; returns a (src, dst) slot move.

        Prompts complete in the order they were admitted (a step plans a later prompt only when
        the earlier ones fit whole), so slot len(decoding) is free or this sequence's own."""
        if not self.prefilling or self.prefilling[0] is not seq:
            raise RuntimeError("prompts must complete in admission order")
        self.prefilling.pop(0)
        dst = len(self.decoding)
        move = None
        if seq.slot != dst:
            if dst not in self._free:  # cannot happen: see `_admit`
                raise RuntimeError("slot invariant broken")
            self._free.discard(dst)
            self._free.add(seq.slot)
            move = (seq.slot, dst)
            seq.slot = dst
        self.decoding.append(seq)
        return move

    def remove(self, seq: SequenceState) -> tuple[int, int] | None:
        """Free a sequence's slot. A decoding one is replaced by the last decoding sequence,
        whose cache must then move (returns (src, dst))."""
        if seq in self.prefilling:
            self.prefilling.remove(seq)
            self._free.add(seq.slot)
            return None
        i = seq.slot
        if not 0 <= i < len(self.decoding) or self.decoding[i] is not seq:
            raise RuntimeError(f"{seq.request.request_id} holds no slot (released twice?)")
        last = self.decoding.pop()
        move = None
        if last is not seq:
            self.decoding[i] = last
            move = (last.slot, i)
            last.slot = i
        self._free.add(len(self.decoding) if move else i)
        return move

    def drop_waiting(self, request_id: str) -> EngineRequest | None:
        for r in self.waiting:
            if r.request_id == request_id:
                self.waiting.remove(r)
                return r
        return None
