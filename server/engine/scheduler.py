"""Which requests run: a bounded waiting queue, a fixed pool of KV-cache slots, and the rule
that decoding sequences occupy slots 0..B-1 (pure Python, no torch)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from .types import EngineRequest


@dataclass
class Sequence:
    request: EngineRequest
    slot: int = -1
    prompt_len: int = 0  # exact, known after image selection
    prefilled: int = 0  # prompt positions already in the cache
    embeds: Any = None  # prompt embeddings `[T, D]` while prefilling
    output_ids: list[int] = field(default_factory=list)
    state: Any = None  # runner-side sampling / detokenizer state
    first_token_time: float | None = None
    last_token_time: float | None = None
    scheduled_time: float | None = None

    @property
    def length(self) -> int:
        """Positions in the cache (prompt + generated tokens already fed back)."""
        return self.prefilled + max(0, len(self.output_ids) - 1)


class Scheduler:
    """Admission never over-commits the cache: a slot holds `max_model_len` positions and a
    request is admitted only with a free slot; at most one sequence prefills at a time."""

    def __init__(self, *, num_slots: int):
        self.num_slots = num_slots
        self.waiting: deque[EngineRequest] = deque()
        self.decoding: list[Sequence] = []  # decoding[i].slot == i
        self.prefilling: Sequence | None = None
        self._free = set(range(num_slots))

    @property
    def num_running(self) -> int:
        return len(self.decoding) + (self.prefilling is not None)

    def add(self, request: EngineRequest) -> None:
        self.waiting.append(request)

    def next_prefill(self) -> Sequence | None:
        """The sequence to prefill next, admitting a waiting request into a free slot if needed."""
        if self.prefilling is None and self.waiting and self._free:
            req = self.waiting.popleft()
            slot = len(self.decoding) if len(self.decoding) in self._free else min(self._free)
            self._free.discard(slot)
            self.prefilling = Sequence(req, slot=slot)
        return self.prefilling

    def finish_prefill(self, seq: Sequence) -> tuple[int, int] | None:
        """Move the prefilled sequence into the decode batch; returns a (src, dst) slot move."""
        assert seq is self.prefilling
        self.prefilling = None
        dst = len(self.decoding)
        move = None
        if seq.slot != dst:
            if dst not in self._free:  # cannot happen: slots >= len(decoding) are free or this one
                raise RuntimeError("slot invariant broken")
            self._free.discard(dst)
            self._free.add(seq.slot)
            move = (seq.slot, dst)
            seq.slot = dst
        self.decoding.append(seq)
        return move

    def remove(self, seq: Sequence) -> tuple[int, int] | None:
        """Free a sequence's slot. A decoding one is replaced by the last decoding sequence,
        whose cache must then move (returns (src, dst))."""
        if seq is self.prefilling:
            self.prefilling = None
            self._free.add(seq.slot)
            return None
        i = seq.slot
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
