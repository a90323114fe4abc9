"""Which requests run and what each step does (pure Python, no torch).

A bounded waiting queue and a pool of KV-cache blocks (`kv_blocks.BlockPool`). A sequence holds
the blocks its positions need; a prompt reuses the cached blocks of its longest known prefix.
`schedule` plans a step, growing each decoding sequence by the block it writes next and
preempting the newest sequences when blocks run out; `finish_prefill` and `remove` apply a
step's outcome."""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from .kv_blocks import BlockPool, PositionKey, block_key
from .types import EngineRequest


@dataclass(eq=False)  # identity: sequences are looked up in the scheduler's lists
class SequenceState:
    """One request in the engine, from admission (or preemption) to its end."""

    request: EngineRequest
    prompt_len: int = 0  # exact, known after image selection (0 before)
    computed: int = 0  # positions whose K/V is in the cache
    embeds: Any = None  # prompt embeddings `[T, D]`, kept until the end (a preempted prompt runs again)
    prompt_logits: Any = None  # `[1, V]` of the last prompt position, for forks (n>1 siblings), one step
    output_ids: list[int] = field(default_factory=list)
    state: Any = None  # runner-side sampling / detokenizer state
    blocks: list[int] = field(default_factory=list)  # block table: position p in blocks[p // block_size]
    position_keys: list[PositionKey] | None = None  # what each prompt position holds (see kv_blocks)
    block_keys: list[bytes] = field(default_factory=list)  # keys of the full blocks known so far
    registered: int = 0  # blocks[:registered] are keyed in the pool
    order: int = 0  # admission order: the newest are preempted first
    preemptions: int = 0
    first_token_time: float | None = None
    last_token_time: float | None = None

    @property
    def begun(self) -> bool:
        """Selection and prompt embedding done (prompt_len known)."""
        return self.state is not None

    @property
    def prompt_left(self) -> int:
        """Prompt positions still to prefill (an upper bound before it has begun)."""
        return max(0, (self.prompt_len if self.begun else self.request.max_prompt_tokens) - self.computed)

    @property
    def ready(self) -> int:
        """Positions that must be in the cache before the next token is sampled: the prompt, then
        each generated token but the last (which the next decode step feeds)."""
        return self.prompt_len + max(0, len(self.output_ids) - 1)

    @property
    def replaying(self) -> bool:
        """Decoding positions lost to preemption: this step feeds an earlier token again."""
        return self.computed < self.ready

    def token_at(self, position: int) -> int:
        """The generated token fed at `position` (>= prompt_len)."""
        return self.output_ids[position - self.prompt_len]

    def position_key(self, position: int, private: bool = False) -> PositionKey:
        """What was fed at `position`. Generated tokens are keyed apart from prompt tokens: decode
        computes their K/V, prefill a prompt's, and the two need not agree to the last bit.
        `private`: keyed for this sequence alone (its own K/V, found again after a preemption)."""
        if position >= self.prompt_len:
            token = self.token_at(position)
            return ("gen", self.request.request_id, token) if private else ("gen", token)
        return None if self.position_keys is None else self.position_keys[position]


@dataclass
class StepPlan:
    """One engine step: prompt chunks to run (in order, sharing `prefill_budget` positions), then
    one batched decode of `decodes`."""

    prefills: list[SequenceState]
    decodes: list[SequenceState]
    prefill_budget: int
    copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) blocks to copy first (copy on write)

    @property
    def empty(self) -> bool:
        return not self.prefills and not self.decodes


class Scheduler:
    """At most `max_batch_size` sequences run at once, within the blocks of `pool`. A request is
    admitted with blocks to spare (one per decoding sequence, for their next writes); when a
    decoding sequence needs a block and none is free, running sequences are preempted: their
    blocks are released (the full ones stay cached) and they wait at the head of the queue, to be
    computed again, keeping every token they produced.

    Preemption policy (progress under sustained memory pressure):
    - the victim is the sequence admitted last *for the first time*: a preempted sequence keeps its
      place when it comes back, so a sequence admitted after it is preempted before it, and the
      oldest running sequence is never preempted for another (it always progresses);
    - a preempted sequence comes back only when the blocks for everything it had (prompt and
      generated positions) are free beside one per decoding sequence, so that it is not let in
      only to be preempted again before it catches up;
    - its full blocks stay cached, generated ones included (keyed for it alone where decode is
      not batch-invariant, see `key_generated`): back, it reuses what was not evicted meanwhile
      instead of replaying it."""

    def __init__(self, *, max_batch_size: int, pool: BlockPool, prefill_chunk: int = 512,
                 key_generated: bool = True):
        if prefill_chunk % pool.block_size:
            raise ValueError(f"the prefill chunk ({prefill_chunk}) must be a multiple of the block size "
                             f"({pool.block_size})")
        self.max_batch_size = max_batch_size
        self.pool = pool
        self.block_size = pool.block_size
        self.prefill_chunk = prefill_chunk
        # Blocks holding generated tokens are keyed, so that a preempted sequence finds its own
        # decoded positions again. Shared with other sequences (same prompt, same tokens) only
        # where decode is batch-invariant, i.e. a position's K/V depends on nothing but what
        # precedes it (CPU float32); elsewhere keyed for their sequence alone and forgotten when
        # it ends (no one else could use them).
        self.key_generated = key_generated
        self._copies: list[tuple[int, int]] = []  # this step's copies on write
        self.waiting: deque[SequenceState] = deque()
        self.decoding: list[SequenceState] = []
        self.prefilling: list[SequenceState] = []  # admitted, prompt not all in the cache yet
        self._order = itertools.count()
        # counters the engine reads (and resets) for its stats
        self.preempted = 0
        self.prefix_queried = 0  # prompt positions looked up in the prefix cache
        self.prefix_hits = 0  # of which found there

    @property
    def num_running(self) -> int:
        return len(self.decoding) + len(self.prefilling)

    @property
    def has_work(self) -> bool:
        return bool(self.decoding or self.prefilling or self.waiting)

    def add(self, request: EngineRequest) -> None:
        self.waiting.append(SequenceState(request))

    def reset(self) -> None:
        """Forget every admitted sequence and every block (after a failure of the bookkeeping)."""
        self.decoding, self.prefilling = [], []
        self.pool = BlockPool(self.pool.num_blocks, self.block_size, prefix_caching=self.pool.prefix_caching)

    # -- planning ----------------------------------------------------------------------------------
    def schedule(self, prefill_budget: int) -> StepPlan:
        """Every decoding sequence first, each with a block for the position it writes (oldest
        first; the newest are preempted when blocks run out). Then prompt work: the sequence being
        prefilled (one chunk if it does not fit), then further waiting prompts while each surely
        fits whole in what is left of the budget (a prompt's chunks never depend on what else was
        admitted: same numbers)."""
        self._copies: list[tuple[int, int]] = []
        for seq in sorted(self.decoding, key=lambda s: s.order):
            if seq in self.decoding:  # not preempted for an older one meanwhile
                self._grow(seq, seq.computed + 1)
        decodes = list(self.decoding)  # a preempted sequence admitted below decodes from the next step
        prefills = list(self.prefilling)
        if not prefills:  # a new prompt starts even if only its first chunk fits
            seq = self._admit(prefill_budget)
            prefills += [seq] if seq is not None else []
        budget = prefill_budget - sum(s.prompt_left for s in prefills)
        while budget > 0 and self.waiting and self.waiting[0].prompt_left <= budget:
            seq = self._admit(budget)
            if seq is None:
                break
            prefills.append(seq)
            budget -= seq.prompt_left
        return StepPlan(prefills, decodes, prefill_budget, self._copies)

    def _blocks_for(self, positions: int) -> int:
        return -(-positions // self.block_size)

    def _admit(self, budget: int) -> SequenceState | None:
        if not self.waiting or self.num_running >= self.max_batch_size:
            return None
        seq = self.waiting[0]
        first_chunk = min(seq.prompt_left, budget) if seq.prompt_left else 1
        # preempted: room to get back to where it was (see the preemption policy)
        need = self._blocks_for(seq.ready + 1 if seq.preemptions else first_chunk)
        if self.pool.num_free < need + len(self.decoding):
            return None  # wait for blocks
        self.waiting.popleft()
        if not seq.preemptions:  # back from a preemption, it keeps its place
            seq.order = next(self._order)
        if seq.begun:  # preempted earlier: its cached blocks may still be there
            self.match_prefix(seq)
            if seq.computed >= seq.prompt_len:
                self.decoding.append(seq)
                return None
        self.prefilling.append(seq)
        return seq

    def _grow(self, seq: SequenceState, positions: int) -> bool:
        """Blocks for `positions` positions of a decoding sequence, preempting the newest running
        sequences while none is free. A block it shares and is about to write is copied first
        (the copy is the plan's). False if `seq` itself was preempted."""
        while True:
            tail = seq.computed // self.block_size  # the block the next position goes to
            shared = tail < len(seq.blocks) and self.pool.refs(seq.blocks[tail]) > 1
            need = max(0, self._blocks_for(positions) - len(seq.blocks)) + shared
            if need <= self.pool.num_free:
                break
            victim = max(self.decoding + self.prefilling, key=lambda s: s.order)
            self.preempt(victim)
            if victim is seq:
                return False
        if shared:
            src, (dst,) = seq.blocks[tail], self.pool.allocate(1)
            self.pool.release([src])
            seq.blocks[tail] = dst
            self._copies.append((src, dst))
            need -= 1
        if need > 0:
            seq.blocks += self.pool.allocate(need)
        return True

    def preempt(self, seq: SequenceState) -> None:
        """Release a running sequence's blocks; it waits first in line to run again."""
        self._leave(seq)
        seq.computed = seq.registered = 0
        seq.preemptions += 1
        self.preempted += 1
        self.waiting.appendleft(seq)

    # -- blocks of prompts (called by the executor once a prompt's positions are known) ----------
    def match_prefix(self, seq: SequenceState) -> None:
        """Take the cached blocks of the sequence's longest known prefix (never all it needs: the
        position before the next sample is always computed, for its logits).

        Where the rest of the prompt is prefilled, the hit ends on a multiple of the prefill
        chunk: the chunks then start where a run without the cache starts them, and every bit
        comes out the same (a chunk computes the same numbers from the same inputs; cached
        blocks were computed by the same chunks of the same prefix)."""
        if seq.computed or seq.blocks:
            return
        limit = (seq.ready - 1 if not seq.output_ids else seq.ready) // self.block_size
        self._extend_keys(seq, limit)
        hits = self.pool.match(seq.block_keys[:limit])
        if len(hits) * self.block_size < seq.prompt_len:
            keep = len(hits) * self.block_size // self.prefill_chunk * self.prefill_chunk // self.block_size
            self.pool.release(hits[keep:])
            hits = hits[:keep]
        seq.blocks = hits
        seq.registered = len(hits)
        seq.computed = len(hits) * self.block_size
        if not seq.preemptions:  # a prompt's first lookup (a preempted one finds its own blocks)
            self.prefix_queried += seq.prompt_len
            self.prefix_hits += seq.computed

    def reserve(self, seq: SequenceState, positions: int) -> bool:
        """Blocks for a prompt chunk up to `positions`, if free (prompt work never preempts)."""
        need = self._blocks_for(positions) - len(seq.blocks)
        if need > self.pool.num_free:
            return False
        if need > 0:
            seq.blocks += self.pool.allocate(need)
        return True

    def commit(self, seq: SequenceState) -> None:
        """Key the blocks a step filled, so that later prefixes (or this sequence, once preempted)
        can reuse them."""
        full = seq.computed // self.block_size
        if full <= seq.registered or not self.pool.prefix_caching:
            return
        self._extend_keys(seq, full)
        for i in range(seq.registered, min(full, len(seq.block_keys))):
            self.pool.register(seq.blocks[i], seq.block_keys[i])
        seq.registered = full

    def _extend_keys(self, seq: SequenceState, blocks: int) -> None:
        bs = self.block_size
        while len(seq.block_keys) < blocks:
            i = len(seq.block_keys)
            private = not self.key_generated
            key = block_key(seq.block_keys[-1] if i else b"",
                            [seq.position_key(p, private) for p in range(i * bs, (i + 1) * bs)])
            if key is None:  # an unidentified position: no later block is shared either
                return
            seq.block_keys.append(key)

    # -- forks: the choices of an n>1 request ----------------------------------------------------
    def waiting_siblings(self, parent: SequenceState) -> list[SequenceState]:
        """Choices of `parent`'s request waiting with their prompt not begun, as many as may run."""
        group = parent.request.group
        if group is None:
            return []
        room = self.max_batch_size - self.num_running
        return [s for s in self.waiting if s.request.group == group and not s.begun][:max(0, room)]

    def fork(self, parent: SequenceState, child: SequenceState) -> None:
        """`child` (same prompt) starts decoding on `parent`'s blocks, its prompt all computed. The
        last, partly filled block is shared too, and copied by whichever writes it first."""
        self.waiting.remove(child)
        self.pool.share(parent.blocks)
        child.blocks = list(parent.blocks)
        child.computed, child.prompt_len = parent.computed, parent.prompt_len
        child.position_keys, child.block_keys = parent.position_keys, list(parent.block_keys)
        child.registered = parent.registered
        child.order = next(self._order)
        self.decoding.append(child)
        self.prefix_queried += child.prompt_len
        self.prefix_hits += child.prompt_len

    # -- applying a step's outcome -----------------------------------------------------------------
    def finish_prefill(self, seq: SequenceState) -> None:
        """A fully prefilled sequence joins the decode batch."""
        self.prefilling.remove(seq)
        self.decoding.append(seq)

    def remove(self, seq: SequenceState) -> None:
        """A sequence that finished, failed or was aborted leaves, releasing its blocks."""
        if seq in self.waiting:  # preempted meanwhile
            self.waiting.remove(seq)
            self._forget_private(seq)
            return
        if seq not in self.decoding and seq not in self.prefilling:
            raise RuntimeError(f"{seq.request.request_id} is not running (released twice?)")
        self._forget_private(seq)
        self._leave(seq)

    def _forget_private(self, seq: SequenceState) -> None:
        """A sequence that ends: its privately keyed blocks (generated positions where decode is
        not batch-invariant) are of no use to anyone else."""
        if not self.key_generated and seq.begun:
            first = seq.prompt_len // self.block_size
            self.pool.forget(seq.blocks[first:])  # those it holds
            self.pool.forget_keys(seq.block_keys[first:])  # those it left cached when preempted

    def _leave(self, seq: SequenceState) -> None:
        (self.decoding if seq in self.decoding else self.prefilling).remove(seq)
        self.pool.release(seq.blocks)
        seq.blocks = []

    def drop_waiting(self, request_id: str) -> SequenceState | None:
        for s in self.waiting:
            if s.request.request_id == request_id:
                self.waiting.remove(s)
                self._forget_private(s)
                return s
        return None
