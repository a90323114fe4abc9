"""Which requests run and what each step does (pure Python, no torch).

A waiting queue and a pool of KV-cache blocks (`kv_blocks.BlockPool`). A sequence holds the
blocks its positions need; a prompt reuses the cached blocks of its longest known prefix.
`schedule` returns a complete plan (prompt chunks with their ends and reserved blocks, forks,
decodes, copies on write), growing each decoding sequence by the block it writes next and
preempting the newest sequences when blocks run out; `update_from_output` applies what the
executor returns. The scheduler is the only writer of a sequence's counters and blocks."""

from __future__ import annotations

import itertools
from collections import deque

from .kv_blocks import BlockPool, block_key
from .sequence import SequenceState
from .step import NewToken, PromptChunk, StepOutput, StepPlan, StepUpdate
from .types import EngineError


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
        self._by_id: dict[str, SequenceState] = {}  # every sequence here, waiting or running
        self.decoding: list[SequenceState] = []
        self.prefilling: list[SequenceState] = []  # admitted, prompt not all in the cache yet
        self.forking: list[SequenceState] = []  # out of the queue for this step's forks (until its update)
        self._order = itertools.count()
        # counters the engine reads (and resets) for its stats
        self.preempted = 0
        self.prefix_queried = 0  # prompt positions looked up in the prefix cache
        self.prefix_hits = 0  # of which found there

    @property
    def num_running(self) -> int:
        return len(self.decoding) + len(self.prefilling) + len(self.forking)

    @property
    def has_work(self) -> bool:
        return bool(self.decoding or self.prefilling or self.waiting)

    def add(self, seq: SequenceState) -> None:
        self.waiting.append(seq)
        self._by_id[seq.request.request_id] = seq

    @property
    def num_sequences(self) -> int:
        """Every sequence here: waiting (prepared or not), running, forking."""
        return len(self._by_id)

    def get(self, request_id: str) -> SequenceState | None:
        return self._by_id.get(request_id)

    def group(self, group: str) -> list[SequenceState]:
        """The waiting choices of one n>1 request."""
        return [s for s in self.waiting if s.request.group == group]

    def reset(self) -> list[SequenceState]:
        """Forget every admitted sequence (preempted ones too) and every block, after a failure of
        the bookkeeping; -> the sequences forgotten. Those never admitted wait on."""
        dropped = self.decoding + self.prefilling + self.forking + [s for s in self.waiting if s.preemptions]
        self.decoding, self.prefilling, self.forking = [], [], []
        self.waiting = deque(s for s in self.waiting if not s.preemptions)
        for seq in dropped:
            self._by_id.pop(seq.request.request_id, None)
        self.pool = BlockPool(self.pool.num_blocks, self.block_size, prefix_caching=self.pool.prefix_caching)
        return dropped

    # -- planning ----------------------------------------------------------------------------------
    def to_prepare(self, prefill_budget: int) -> list[SequenceState]:
        """Waiting sequences not prepared yet that the next `schedule` may admit (at the head of
        the queue, within the batch's room and the budget by their upper bounds): preparing them
        first gives it their exact lengths. Preparing no further keeps the others' image features
        (bounded, see vision.FeatureBudget) from turning into embeddings early."""
        todo, room = [], self.max_batch_size - self.num_running
        budget = prefill_budget - sum(s.prompt_left for s in self.prefilling)
        for i, seq in enumerate(self.waiting):
            if i >= room or (i and seq.prompt_left > budget):
                break
            budget -= seq.prompt_left
            if not seq.prepared:
                todo.append(seq)
        return todo

    def schedule(self, prefill_budget: int) -> StepPlan:
        """Every decoding sequence first, each with a block for the position it writes (oldest
        first; the newest are preempted when blocks run out). Then prompt work: the sequence being
        prefilled (one chunk if it does not fit), then further waiting prompts while each fits
        whole in what is left of the budget (a prompt's chunks never depend on what else was
        admitted: same numbers). A chunk runs only when its blocks are free (prompt work never
        preempts); otherwise its sequence waits a step."""
        self._copies = []
        for seq in sorted(self.decoding, key=lambda s: s.order):
            if seq in self.decoding:  # not preempted for an older one meanwhile
                self._grow(seq, seq.computed + 1)
        decodes = list(self.decoding)  # a preempted sequence admitted below decodes from the next step
        started: list[SequenceState] = []
        prefills = list(self.prefilling)
        if not prefills:  # a new prompt starts even if only its first chunk fits
            seq = self._admit(prefill_budget, started)
            prefills += [seq] if seq is not None else []
        budget = prefill_budget - sum(s.prompt_left for s in prefills)
        while budget > 0 and self.waiting and self.waiting[0].prompt_left <= budget:
            seq = self._admit(budget, started)
            if seq is None:
                break
            prefills.append(seq)
            budget -= seq.prompt_left
        chunks = self._chunks(prefills, prefill_budget)
        started += [child for chunk in chunks for child in chunk.forks]
        return StepPlan(chunks, decodes, self._copies, started)

    def _chunks(self, prefills: list[SequenceState], budget: int) -> list[PromptChunk]:
        chunks = []
        room = self.max_batch_size - self.num_running
        for seq in prefills:
            if budget <= 0:
                break
            end = min(seq.prompt_len, seq.computed + budget)
            if not self._reserve(seq, end):
                continue
            chunk = PromptChunk(seq, seq.computed, end, first=not seq.preemptions and seq.computed == seq.prefix_hit,
                                samples=end == seq.prompt_len and not seq.output_ids)
            if chunk.samples and seq.request.group is not None and room > 0:
                chunk.forks = self._take_siblings(seq, room)
                room -= len(chunk.forks)
            chunks.append(chunk)
            budget -= end - seq.computed
        return chunks

    def _blocks_for(self, positions: int) -> int:
        return -(-positions // self.block_size)

    def _admit(self, budget: int, started: list[SequenceState]) -> SequenceState | None:
        if not self.waiting or self.num_running >= self.max_batch_size or not self.waiting[0].prepared:
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
            started.append(seq)
        self._match_prefix(seq)
        if seq.computed >= seq.prompt_len:  # preempted, and its blocks were all still cached
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

    # -- blocks of prompts ---------------------------------------------------------------------------
    def _match_prefix(self, seq: SequenceState) -> None:
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
            seq.prefix_hit = seq.computed
            self.prefix_queried += seq.prompt_len
            self.prefix_hits += seq.computed

    def _reserve(self, seq: SequenceState, positions: int) -> bool:
        """Blocks for a prompt chunk up to `positions`, if free."""
        need = self._blocks_for(positions) - len(seq.blocks)
        if need > self.pool.num_free:
            return False
        if need > 0:
            seq.blocks += self.pool.allocate(need)
        return True

    def _commit(self, seq: SequenceState) -> None:
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
    def _take_siblings(self, parent: SequenceState, room: int) -> list[SequenceState]:
        """Choices of `parent`'s request waiting, prepared and never admitted, as many as may run;
        they leave the queue for the step (see `update_from_output`)."""
        group = parent.request.group
        siblings = [s for s in self.waiting if s.request.group == group and s.prepared and not s.preemptions][:room]
        for child in siblings:
            self.waiting.remove(child)
        self.forking += siblings
        return siblings

    def _fork(self, parent: SequenceState, child: SequenceState) -> None:
        """`child` (same prompt) decodes on `parent`'s blocks, its prompt all computed. The last,
        partly filled block is shared too, and copied by whichever writes it first."""
        self.pool.share(parent.blocks)
        child.blocks = list(parent.blocks)
        child.computed = parent.computed
        child.position_keys, child.block_keys = parent.position_keys, list(parent.block_keys)
        child.registered = parent.registered
        child.order = next(self._order)
        self.decoding.append(child)
        self.prefix_queried += child.prompt_len
        self.prefix_hits += child.prompt_len

    # -- applying a step's outcome -----------------------------------------------------------------
    def update_from_output(self, plan: StepPlan, output: StepOutput) -> StepUpdate:
        """Apply what the executor did: positions computed (and keyed), sampled tokens appended,
        prompts that completed join the decode batch, forks decode on their parent's blocks, and
        sequences that failed leave (releasing their blocks)."""
        update = StepUpdate()
        for seq, out in zip(plan.decodes, output.decodes):
            if out.error is not None:
                self._fail(seq, out.error, update)
            elif out.ran:
                seq.computed += 1
                self._commit(seq)
                if out.token is not None:
                    seq.output_ids.append(out.token)
                    update.tokens.append(NewToken(seq, out.token, out.info, False))
        for chunk, out in zip(plan.chunks, output.chunks):
            self._apply_chunk(chunk, out, update)
        self.forking = []
        return update

    def _apply_chunk(self, chunk: PromptChunk, out, update: StepUpdate) -> None:
        seq = chunk.seq
        if out.error is not None:
            self.waiting.extendleft(reversed(chunk.forks))  # they compute their own prompt later
            self._fail(seq, out.error, update)
            return
        seq.computed = chunk.end
        self._commit(seq)
        if chunk.end < seq.prompt_len:  # more chunks to come
            return
        self.prefilling.remove(seq)
        self.decoding.append(seq)
        if out.first is None:  # computed again after preemption: it has its tokens
            return
        for child, result in zip(chunk.forks, out.forks):
            if isinstance(result, EngineError):
                self._by_id.pop(child.request.request_id, None)
                update.failed.append((child, result))
                continue
            self._fork(seq, child)
            child.output_ids.append(result[0])
            update.tokens.append(NewToken(child, *result, True))
        seq.output_ids.append(out.first[0])
        update.tokens.append(NewToken(seq, *out.first, True))

    def _fail(self, seq: SequenceState, error: EngineError, update: StepUpdate) -> None:
        self.remove(seq)
        update.failed.append((seq, error))

    def remove(self, seq: SequenceState) -> None:
        """A sequence that finished, failed or was aborted leaves, releasing its blocks."""
        if self._by_id.pop(seq.request.request_id, None) is None:
            raise RuntimeError(f"{seq.request.request_id} is not in the scheduler (released twice?)")
        seq.embeds = None
        if seq in self.waiting:  # not admitted yet, or preempted
            self.waiting.remove(seq)
        else:
            self._leave(seq)
        self._forget_private(seq)

    def _forget_private(self, seq: SequenceState) -> None:
        """A sequence that ends: its privately keyed blocks (generated positions where decode is
        not batch-invariant) are of no use to anyone else."""
        if not self.key_generated and seq.prepared:
            first = seq.prompt_len // self.block_size
            self.pool.forget(seq.blocks[first:])  # those it holds
            self.pool.forget_keys(seq.block_keys[first:])  # those it left cached when preempted

    def _leave(self, seq: SequenceState) -> None:
        (self.decoding if seq in self.decoding else self.prefilling).remove(seq)
        self.pool.release(seq.blocks)
        seq.blocks = []
