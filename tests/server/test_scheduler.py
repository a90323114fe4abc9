"""The scheduler alone (pure Python, no torch, no model), driven as the engine drives it: plans
from `schedule`, outputs as a model would return them to `update_from_output`. Step plans, block
accounting, prefix reuse, forks and preemption."""

import random

import pytest

from model.sampling_params import SamplingParams
from server.engine.kv_blocks import BlockPool
from server.engine.scheduler import Scheduler
from server.engine.sequence import SequenceState
from server.engine.step import ChunkOutput, DecodeOutput, StepOutput, StepPlan
from server.engine.types import EngineError, EngineRequest, ErrorKind

FAILED = EngineError(ErrorKind.MODEL_ERROR, "x")


def _sched(blocks: int = 1000, batch: int = 8, block_size: int = 16, prefix_caching: bool = True,
           align: int = 16) -> Scheduler:
    """`align`: the prefill chunk prompt hits are aligned to (one block here, to see every hit)."""
    return Scheduler(max_batch_size=batch, pool=BlockPool(blocks + 1, block_size, prefix_caching=prefix_caching),
                     prefill_chunk=align)


def _add(sched: Scheduler, i: int, prompt: int, tokens: list[int] | None = None,
         group: str | None = None) -> SequenceState:
    """A prepared sequence (what the runner's preparation gives: its length and position keys)."""
    ids = tokens if tokens is not None else [1000 + i] * prompt  # distinct prompts unless given
    seq = SequenceState(EngineRequest(f"r{i}", ids, [], SamplingParams(max_tokens=4), len(ids), group=group))
    seq.state, seq.prompt_len, seq.position_keys = object(), len(ids), list(ids)
    sched.add(seq)
    return seq


def _output(plan: StepPlan, fail: set[str] = frozenset()) -> StepOutput:
    """What the model returns for a plan: the first token (1) where a chunk samples, one token (2)
    per decoding sequence that is not replaying; requests in `fail` fail."""
    def failed(seq):
        return seq.request.request_id in fail

    chunks = [ChunkOutput(error=FAILED) if failed(c.seq) else
              ChunkOutput(first=(1, None) if c.samples else None, forks=[(1, None)] * len(c.forks))
              for c in plan.chunks]
    decodes = [DecodeOutput(error=FAILED) if failed(s) else DecodeOutput(ran=True, token=None if s.replaying else 2)
               for s in plan.decodes]
    return StepOutput(chunks, decodes)


def _step(sched: Scheduler, budget: int = 512, fail: set[str] = frozenset()) -> StepPlan:
    """One engine step: plan, run (as the model would), apply."""
    plan = sched.schedule(budget)
    for seq in plan.decodes:
        assert len(seq.blocks) * sched.block_size > seq.computed, "no block for the position it writes"
    for chunk in plan.chunks:
        assert len(chunk.seq.blocks) * sched.block_size >= chunk.end, "no blocks for the chunk"
    sched.update_from_output(plan, _output(plan, fail))
    return plan


def _ids(seqs) -> list[str]:
    return [s.request.request_id for s in seqs]


def _chunks(plan: StepPlan) -> list[tuple[str, int, int]]:
    return [(c.seq.request.request_id, c.start, c.end) for c in plan.chunks]


def test_short_prompts_share_a_step_and_a_long_one_is_chunked_alone():
    sched = _sched()
    for i, n in enumerate([100, 200, 150, 400, 30]):
        _add(sched, i, n)
    plan = _step(sched)
    assert _chunks(plan) == [("r0", 0, 100), ("r1", 0, 200), ("r2", 0, 150)]  # 450 fit; 400 more would not
    assert plan.decodes == [] and all(c.samples for c in plan.chunks)
    plan = sched.schedule(512)
    assert _chunks(plan) == [("r3", 0, 400), ("r4", 0, 30)]
    assert _ids(plan.decodes) == ["r0", "r1", "r2"]


def test_a_prompt_longer_than_the_budget_runs_alone_until_done():
    sched = _sched()
    seq = _add(sched, 0, 1000)
    _add(sched, 1, 10)
    plan = _step(sched)
    assert _chunks(plan) == [("r0", 0, 512)] and not plan.chunks[0].samples
    assert seq.computed == 512 and len(seq.blocks) == 32 and seq in sched.prefilling
    plan = _step(sched)  # the long one goes on: 488 left, and the 24 to spare fit r1
    assert _chunks(plan) == [("r0", 512, 1000), ("r1", 0, 10)]
    assert seq in sched.decoding and seq.output_ids == [1]


def test_admission_stops_at_the_batch_limit():
    sched = _sched(batch=2)
    for i in range(4):
        _add(sched, i, 10)
    plan = _step(sched)
    assert len(plan.chunks) == 2 and len(sched.waiting) == 2
    assert sched.schedule(512).chunks == []


def test_admission_waits_for_blocks_and_a_prompt_chunk_never_preempts():
    sched = _sched(blocks=10)
    _add(sched, 0, 100)  # 7 blocks
    _step(sched)
    _add(sched, 1, 100)
    plan = sched.schedule(512)
    assert plan.chunks == [] and len(sched.waiting) == 1  # 3 free: not enough for its 7 (and r0's growth)
    sched.remove(sched.decoding[0])
    assert sched.pool.num_used == 0
    plan = sched.schedule(512)
    assert _chunks(plan) == [("r1", 0, 100)]


def test_only_sequences_prepared_are_admitted_and_the_head_is_prepared_first():
    sched = _sched(batch=3)
    for i, n in enumerate([100, 300, 200, 50]):
        seq = SequenceState(EngineRequest(f"r{i}", [1000 + i] * n, [], SamplingParams(max_tokens=4), n))
        sched.add(seq)
    # the head while it fits the budget by the upper bounds, within the batch's room
    assert _ids(sched.to_prepare(512)) == ["r0", "r1"]
    assert sched.schedule(512).chunks == []  # nothing prepared: nothing to plan
    for seq in sched.to_prepare(512):
        seq.state, seq.prompt_len, seq.position_keys = object(), len(seq.request.input_ids), seq.request.input_ids
    assert _chunks(sched.schedule(512)) == [("r0", 0, 100), ("r1", 0, 300)]


def test_a_repeated_prefix_reuses_its_full_blocks_and_leaves_the_last_position_to_compute():
    sched = _sched()
    system = list(range(100, 150))  # 50 positions: 3 full blocks of 16
    first = _add(sched, 0, 0, system + [7, 8])
    _step(sched)
    seq = _add(sched, 1, 0, system + [9])
    plan = sched.schedule(512)
    assert _chunks(plan) == [("r1", 48, 51)]  # the prefix is found at admission
    assert seq.blocks[:3] == first.blocks[:3]  # shared, not copied
    assert sched.prefix_hits == 48 and sched.prefix_queried == 52 + 51
    sched.update_from_output(plan, _output(plan))
    # the very same prompt: everything but its last block's positions is reused
    twin = _add(sched, 2, 0, system + [7, 8])
    _step(sched)
    assert twin.blocks[:3] == first.blocks[:3]
    # a prompt of exactly 3 blocks keeps its last position to compute (its logits give the first token)
    _add(sched, 3, 0, system[:48])
    assert _chunks(sched.schedule(512))[-1] == ("r3", 32, 48)


def test_a_prompt_hit_ends_on_a_prefill_chunk_boundary_so_the_rest_computes_as_without_the_cache():
    sched = _sched(align=32)
    system = list(range(100, 150))  # 3 full blocks of 16 cached ...
    first = _add(sched, 0, 0, system + [7])
    _step(sched, 512)
    while first.computed < first.prompt_len:
        _step(sched, 512)
    seq = _add(sched, 1, 0, system + [9])
    sched.schedule(32)
    assert seq.computed == 32 and seq.blocks[:2] == first.blocks[:2]  # ... 2 of them used: chunks then start at 32
    assert sched.pool.refs(first.blocks[2]) == 1  # the third one was let go
    with pytest.raises(ValueError, match="multiple of the block size"):
        _sched(align=24)


def test_cached_blocks_outlive_their_sequence_until_memory_is_needed():
    sched = _sched(blocks=8)
    prompt = list(range(64))  # 4 blocks
    _add(sched, 0, 0, prompt + [1])
    _step(sched)
    sched.remove(sched.decoding[0])
    assert sched.pool.num_used == 0 and sched.pool.num_cached == 4  # free for anyone, still findable
    seq = _add(sched, 1, 0, prompt + [2])
    sched.schedule(512)
    assert seq.computed == 64
    sched.remove(seq)
    _add(sched, 2, 0, list(range(500, 620)))  # 8 blocks: evicts every cached one
    _step(sched)
    assert sched.pool.num_cached == 7  # its own full blocks, now keyed
    sched.remove(sched.decoding[0])
    seq = _add(sched, 3, 0, prompt + [3])
    sched.schedule(512)
    assert seq.computed == 0


def test_without_prefix_caching_nothing_is_shared():
    sched = _sched(prefix_caching=False)
    for i in range(2):
        _add(sched, i, 0, list(range(100)))
        _step(sched)
    a, b = sched.decoding
    assert not set(a.blocks) & set(b.blocks) and sched.pool.num_cached == 0


def test_when_blocks_run_out_the_newest_sequence_is_preempted_and_later_replays():
    sched = _sched(blocks=12)
    for i in range(3):
        _add(sched, i, 60)  # 4 blocks each: all 12
    for _ in range(3):
        _step(sched)
    assert sched.pool.num_free == 0 and len(sched.decoding) == 3
    oldest, _, newest = sorted(sched.decoding, key=lambda s: s.order)
    for _ in range(5):  # positions 60..63 fill their 4th blocks; position 64 needs a 5th
        _step(sched)
    assert _ids(sched.waiting) == ["r2"] and sched.preempted == 1
    assert newest.computed == 0 and newest.blocks == [] and newest.output_ids == [1, 2, 2, 2, 2]
    # the others finish; the preempted one comes back, finds its prompt blocks cached, and
    # replays its generated positions through decode steps without sampling again
    for seq in list(sched.decoding):
        sched.remove(seq)
    plan = _step(sched)
    assert _chunks(plan) == [("r2", 32, 60)]  # two of its blocks were taken by the others; the first two still cached
    assert not plan.chunks[0].samples  # it has its first token
    assert newest in sched.decoding and newest.output_ids == [1, 2, 2, 2, 2] and newest.computed == 60
    replays = 0
    while newest.replaying:
        _step(sched)
        replays += 1
    # positions 60..63 fed again (their tokens are known); position 64 then samples as before
    assert replays == 4 and newest.output_ids == [1, 2, 2, 2, 2] and newest.computed == 64


def _check_accounting(sched: Scheduler) -> None:
    """Every block is held as often as the pool counts, and a block two sequences hold is a cached
    (keyed, full) one; waiting sequences hold none."""
    held: dict[int, int] = {}
    for seq in sched.decoding + sched.prefilling:
        assert len(seq.blocks) * sched.block_size >= seq.computed
        for b in seq.blocks:
            held[b] = held.get(b, 0) + 1
    assert all(sched.pool._ref[b] == c for b, c in held.items())
    assert sched.pool.num_used == len(held)
    assert all(c == 1 or b in sched.pool._key_of for b, c in held.items())
    assert all(not s.blocks and s.computed == 0 for s in sched.waiting)
    assert sched.num_sequences == len(sched.waiting) + sched.num_running


def test_random_traffic_keeps_the_block_accounting_exact():
    rng = random.Random(3)
    sched = _sched(blocks=60, batch=6)
    shared = list(range(40))  # a common prefix in some prompts
    n = 0
    for _ in range(3000):
        op = rng.random()
        if op < 0.3:
            body = [5000 + n] * rng.randrange(1, 200)
            _add(sched, n, 0, (shared if rng.random() < 0.5 else []) + body)
            n += 1
        elif op < 0.8:  # a step where each chunk or decode may fail
            plan = sched.schedule(rng.choice([64, 256, 512]))
            fail = {s.request.request_id for s in [c.seq for c in plan.chunks] + plan.decodes if rng.random() < 0.01}
            sched.update_from_output(plan, _output(plan, fail))
        else:
            running = sched.decoding + sched.prefilling
            if running:
                sched.remove(rng.choice(running))
        _check_accounting(sched)
    assert sched.preempted > 0 and sched.prefix_hits > 0  # the traffic exercised both


def test_the_choices_of_an_n_request_fork_on_the_first_ones_blocks_and_copy_the_shared_one_on_write():
    sched = _sched()
    prompt = list(range(100, 140))  # 2 full blocks and 8 positions in a third
    parent, *siblings = [_add(sched, i, 0, prompt, group="chat-1") for i in range(4)]
    _add(sched, 9, 0, list(range(40)))  # another request's prompt, not a sibling
    plan = sched.schedule(40)  # one prompt's worth
    assert _chunks(plan) == [("r0", 0, 40)] and plan.chunks[0].forks == siblings
    assert _ids(sched.waiting) == ["r9"] and sched.num_running == 4
    sched.update_from_output(plan, _output(plan))
    assert all(s.output_ids == [1] and s.computed == 40 for s in [parent] + siblings)
    assert sched.pool.num_used == 3 and all(sched.pool.refs(b) == 4 for b in parent.blocks)
    # each writes position 40 into the shared third block: three copy it, the last one keeps it
    shared = parent.blocks[2]
    plan = sched.schedule(0)
    assert len(plan.copies) == 3 and len({dst for _, dst in plan.copies}) == 3
    assert all(src == shared for src, _ in plan.copies) and siblings[-1].blocks[2] == shared
    tails = {s.blocks[2] for s in [parent] + siblings}
    assert len(tails) == 4 and sched.pool.num_used == 6  # 2 shared full blocks + 4 tails, not 4 x 3
    assert all(s.blocks[:2] == parent.blocks[:2] for s in siblings)
    sched.update_from_output(plan, _output(plan))
    assert sched.schedule(0).copies == []  # no block is shared and written any more


def test_forks_go_back_to_the_queue_when_their_parents_prompt_fails_and_one_fork_fails_alone():
    sched = _sched()
    prompt = list(range(100, 140))
    parent, a, b = [_add(sched, i, 0, prompt, group="g") for i in range(3)]
    _step(sched, 40, fail={"r0"})
    assert parent.request.request_id not in {s.request.request_id for s in sched.waiting}
    assert _ids(sched.waiting) == ["r1", "r2"] and sched.pool.num_used == 0  # waiting, in their order
    plan = sched.schedule(40)
    assert _chunks(plan) == [("r1", 0, 40)] and plan.chunks[0].forks == [b]
    out = _output(plan)
    out.chunks[0].forks = [FAILED]
    update = sched.update_from_output(plan, out)
    assert update.failed == [(b, FAILED)] and _ids(sched.decoding) == ["r1"] and sched.num_sequences == 1
    _check_accounting(sched)


def test_a_prompt_preempted_mid_prefill_is_counted_once_in_the_prefix_metrics():
    sched = _sched(blocks=30)
    _add(sched, 0, 100)  # 7 blocks
    _step(sched)
    seq = _add(sched, 1, 200)  # 13 blocks, in chunks of 32
    _step(sched, 32)
    sched.preempt(seq)
    assert _chunks(sched.schedule(512)) == [("r1", 32, 200)]  # back: finds its own first blocks
    assert sched.prefix_queried == 300 and sched.prefix_hits == 0


def test_without_batch_invariant_decode_generated_blocks_are_private_to_their_sequence():
    """Where decode is not batch-invariant another sequence must not read a sequence's decoded
    K/V; the sequence itself may (they are its own numbers), and does after a preemption."""
    for key_generated in (True, False):
        sched = Scheduler(max_batch_size=4, pool=BlockPool(100, 16), prefill_chunk=16, key_generated=key_generated)
        first = _add(sched, 0, 20, [7] * 20)
        for _ in range(41):
            _step(sched)
        assert len(first.block_keys) == 3  # 60 positions: 3 full blocks, 1 of prompt, 2 generated
        # the same prompt and the same tokens in another sequence
        twin = _add(sched, 1, 20, [7] * 20)
        for _ in range(41):
            _step(sched)
        own = list(twin.blocks)
        sched.preempt(twin)  # back, it looks its positions up again
        sched.schedule(512)
        assert twin in sched.decoding and twin.computed == 48
        shared = set(first.blocks) & set(twin.blocks)
        assert len(shared) == (3 if key_generated else 1)  # privately keyed generated blocks are not shared
        assert key_generated or twin.blocks[:3] == own[:3]  # ... but found again by their own sequence
        cached = sched.pool.num_cached
        sched.remove(twin)
        # a finished sequence's private blocks are forgotten (free, not cached: no one can use them)
        assert sched.pool.num_cached == (cached if key_generated else cached - 2)


@pytest.mark.parametrize("key_generated", [True, False])
def test_a_preempted_sequence_reuses_its_own_decoded_blocks_instead_of_replaying(key_generated):
    sched = Scheduler(max_batch_size=4, pool=BlockPool(100, 16), prefill_chunk=16, key_generated=key_generated)
    seq = _add(sched, 0, 20)
    for _ in range(51):  # 70 positions: 4 full blocks
        _step(sched)
    sched.preempt(seq)
    plan = sched.schedule(512)
    assert seq in sched.decoding and plan.chunks == []  # nothing of its prompt to compute
    assert seq.computed == 64  # its 4 full blocks found again; before, without batch invariance: 16
    replays = 0
    while seq.replaying:
        _step(sched)
        replays += 1
    assert replays == 70 - 64 - 1 + 1  # positions 64..69: the partly filled block's, fed again


@pytest.mark.parametrize("key_generated", [True, False])
def test_sustained_memory_pressure_preempts_no_sequence_over_and_over(key_generated):
    """150 requests with long answers arrive faster than 80 blocks can hold. Every one finishes, and
    none is preempted more than a few times: a sequence that comes back keeps its place among the
    victims and returns only with room to catch up. Before, one let back in with a chunk's room
    became the newest and so the next victim: up to 36 preemptions of one sequence."""
    rng = random.Random(0)
    sched = Scheduler(max_batch_size=16, pool=BlockPool(81, 16), prefill_chunk=16, key_generated=key_generated)
    wanted, done, arrived = {}, [], 0
    for _ in range(20_000):
        if arrived < 150 and rng.random() < 0.1:
            seq = _add(sched, arrived, rng.randrange(20, 120))
            wanted[seq.request.request_id] = rng.randrange(50, 300)
            arrived += 1
        _step(sched, 64)
        for seq in list(sched.decoding):
            if len(seq.output_ids) >= wanted[seq.request.request_id]:
                sched.remove(seq)
                done.append(seq)
        if arrived == 150 and not sched.has_work:
            break
    assert len(done) == 150
    preemptions = [s.preemptions for s in done]
    assert sum(preemptions) > 100  # the pressure was real
    assert max(preemptions) <= 5, sorted(preemptions)[-5:]


def test_removing_a_waiting_request():
    sched = _sched()
    _add(sched, 0, 5)
    _add(sched, 1, 5)
    sched.remove(sched.get("r1"))
    assert sched.get("r1") is None and len(sched.waiting) == 1


def test_releasing_a_sequence_twice_is_refused():
    sched = _sched()
    for i in range(3):
        _add(sched, i, 5)
    _step(sched)
    first = sched.decoding[0]
    sched.remove(first)
    with pytest.raises(RuntimeError, match="released twice"):
        sched.remove(first)
    assert len(sched.decoding) == 2 and sched.pool.num_used == 2


def test_every_engine_error_kind_has_an_http_answer():
    from server.errors import engine_error

    for kind in ErrorKind:
        err = engine_error(EngineError(kind, "x"))
        assert 400 <= err.status < 600 and err.type and err.code


def test_a_preempted_sequence_that_ends_while_waiting_leaves_no_private_blocks_cached():
    sched = Scheduler(max_batch_size=4, pool=BlockPool(100, 16), prefill_chunk=16, key_generated=False)
    seq = _add(sched, 0, 20)
    for _ in range(41):
        _step(sched)
    sched.preempt(seq)  # its 3 full blocks stay cached: 1 of prompt, 2 private
    assert sched.pool.num_cached == 3
    sched.remove(seq)  # aborted while waiting to come back
    assert sched.pool.num_cached == 1 and sched.pool.num_free == sched.pool.capacity
    _add(sched, 1, 20)
    for _ in range(41):
        _step(sched)
    sched.preempt(sched.decoding[0])
    sched.remove(sched.get("r1"))
    assert sched.pool.num_cached == 2  # r0's and r1's prompt blocks


def test_only_the_scheduler_writes_a_sequences_counters_and_blocks():
    """grep-able: outside the scheduler no module of the engine assigns `computed`, `output_ids`,
    `blocks`, `registered` or `block_keys` of a sequence."""
    import ast
    from pathlib import Path

    fields = {"computed", "output_ids", "blocks", "registered", "block_keys", "preemptions", "order"}
    writers = set()
    for path in Path("server").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
            for t in (e for target in targets for e in (target.elts if isinstance(target, ast.Tuple) else [target])):
                if isinstance(t, ast.Attribute) and t.attr in fields and not (
                        isinstance(t.value, ast.Name) and t.value.id in ("self", "stats")):
                    writers.add(str(path))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    node.func.attr in ("append", "extend", "pop", "clear", "remove") and \
                    isinstance(node.func.value, ast.Attribute) and node.func.value.attr in fields:
                writers.add(str(path))
    assert writers == {"server/engine/scheduler.py"}, writers
