"""The scheduler alone (pure Python, no torch, no model): step plans, block accounting,
prefix reuse and preemption."""

import random

import pytest

from model.sampling_params import SamplingParams
from server.engine.kv_blocks import BlockPool
from server.engine.scheduler import Scheduler, SequenceState
from server.engine.types import EngineRequest


def _sched(blocks: int = 1000, batch: int = 8, block_size: int = 16, prefix_caching: bool = True,
           align: int = 16) -> Scheduler:
    """`align`: the prefill chunk prompt hits are aligned to (one block here, to see every hit)."""
    return Scheduler(max_batch_size=batch, pool=BlockPool(blocks + 1, block_size, prefix_caching=prefix_caching),
                     prefill_chunk=align)


def _req(i: int, prompt: int, tokens: list[int] | None = None) -> EngineRequest:
    ids = tokens if tokens is not None else [1000 + i] * prompt  # distinct prompts unless given
    return EngineRequest(f"r{i}", ids, [], SamplingParams(max_tokens=4), len(ids))


def _begin(sched: Scheduler, seq: SequenceState) -> None:
    """What the executor does when a prompt first runs: its positions become known."""
    seq.state = object()
    seq.prompt_len = len(seq.request.input_ids)
    seq.position_keys = list(seq.request.input_ids)
    sched.match_prefix(seq)


def _prefill(sched: Scheduler, seq: SequenceState, budget: int) -> int:
    """One prompt chunk as the executor runs it; returns the positions run (0: no blocks)."""
    if not seq.begun:
        _begin(sched, seq)
    end = min(seq.prompt_len, seq.computed + budget)
    if not sched.reserve(seq, end):
        return 0
    ran = end - seq.computed
    seq.computed = end
    sched.commit(seq)
    if seq.computed == seq.prompt_len:
        if not seq.output_ids:
            seq.output_ids.append(1)  # the first token
        sched.finish_prefill(seq)
    return ran


def _decode(sched: Scheduler, seqs: list[SequenceState]) -> None:
    for seq in seqs:
        replay = seq.replaying
        assert len(seq.blocks) * sched.block_size > seq.computed, "no block for the position it writes"
        seq.computed += 1
        sched.commit(seq)
        if not replay:
            seq.output_ids.append(2)


def _admit_fully(sched: Scheduler, plan) -> None:
    for seq in plan.prefills:
        seq.request.input_ids = seq.request.input_ids[:seq.request.max_prompt_tokens]
        assert _prefill(sched, seq, 10**6)


def test_short_prompts_share_a_step_and_a_long_one_is_chunked_alone():
    sched = _sched()
    for i, n in enumerate([100, 200, 150, 400, 30]):
        sched.add(_req(i, n))
    plan = sched.schedule(512)
    assert [s.request.request_id for s in plan.prefills] == ["r0", "r1", "r2"]  # 450 fit; 400 more would not
    assert plan.decodes == []
    _admit_fully(sched, plan)
    plan = sched.schedule(512)
    assert [s.request.request_id for s in plan.prefills] == ["r3", "r4"]
    assert [s.request.request_id for s in plan.decodes] == ["r0", "r1", "r2"]


def test_a_prompt_longer_than_the_budget_runs_alone_until_done():
    sched = _sched()
    sched.add(_req(0, 1000))
    sched.add(_req(1, 10))
    plan = sched.schedule(512)
    assert [s.request.request_id for s in plan.prefills] == ["r0"]
    seq = plan.prefills[0]
    assert _prefill(sched, seq, 512) == 512 and len(seq.blocks) == 32
    plan = sched.schedule(512)
    assert plan.prefills[0] is seq  # the long one goes on: 488 left, and the 24 to spare fit r1
    assert [s.request.request_id for s in plan.prefills] == ["r0", "r1"]


def test_admission_stops_at_the_batch_limit():
    sched = _sched(batch=2)
    for i in range(4):
        sched.add(_req(i, 10))
    plan = sched.schedule(512)
    assert len(plan.prefills) == 2 and len(sched.waiting) == 2
    _admit_fully(sched, plan)
    assert sched.schedule(512).prefills == []


def test_admission_waits_for_blocks_and_a_prompt_chunk_never_preempts():
    sched = _sched(blocks=10)
    sched.add(_req(0, 100))  # 7 blocks
    _admit_fully(sched, sched.schedule(512))
    sched.add(_req(1, 100))
    plan = sched.schedule(512)
    assert plan.prefills == [] and len(sched.waiting) == 1  # 3 free: not enough for its 7 (and r0's growth)
    sched.remove(sched.decoding[0])
    assert sched.pool.num_used == 0
    plan = sched.schedule(512)
    assert [s.request.request_id for s in plan.prefills] == ["r1"]


def test_a_repeated_prefix_reuses_its_full_blocks_and_leaves_the_last_position_to_compute():
    sched = _sched()
    system = list(range(100, 150))  # 50 positions: 3 full blocks of 16
    sched.add(_req(0, 0, system + [7, 8]))
    _admit_fully(sched, sched.schedule(512))
    first = sched.decoding[0]
    sched.add(_req(1, 0, system + [9]))
    plan = sched.schedule(512)
    seq = plan.prefills[0]
    _begin(sched, seq)
    assert seq.computed == 48 and seq.blocks == first.blocks[:3]  # shared, not copied
    assert sched.prefix_hits == 48 and sched.prefix_queried == 52 + 51
    # the very same prompt: everything but its last block's positions is reused
    sched.add(_req(2, 0, system + [7, 8]))
    _admit_fully(sched, sched.schedule(512))
    assert sched.decoding[-1].blocks[:3] == first.blocks[:3]
    # a prompt of exactly 3 blocks keeps its last position to compute (its logits give the first token)
    sched.add(_req(3, 0, system[:48]))
    seq = sched.schedule(512).prefills[-1]
    _begin(sched, seq)
    assert seq.computed == 32


def test_a_prompt_hit_ends_on_a_prefill_chunk_boundary_so_the_rest_computes_as_without_the_cache():
    sched = _sched(align=32)
    system = list(range(100, 150))  # 3 full blocks of 16 cached ...
    sched.add(_req(0, 0, system + [7]))
    _admit_fully(sched, sched.schedule(512))
    sched.add(_req(1, 0, system + [9]))
    seq = sched.schedule(512).prefills[0]
    _begin(sched, seq)
    assert seq.computed == 32 and len(seq.blocks) == 2  # ... 2 of them used: chunks then start at 32
    assert sched.pool.refs(sched.decoding[0].blocks[2]) == 1  # the third one was let go
    with pytest.raises(ValueError, match="multiple of the block size"):
        _sched(align=24)


def test_cached_blocks_outlive_their_sequence_until_memory_is_needed():
    sched = _sched(blocks=8)
    prompt = list(range(64))  # 4 blocks
    sched.add(_req(0, 0, prompt + [1]))
    _admit_fully(sched, sched.schedule(512))
    sched.remove(sched.decoding[0])
    assert sched.pool.num_used == 0 and sched.pool.num_cached == 4  # free for anyone, still findable
    sched.add(_req(1, 0, prompt + [2]))
    seq = sched.schedule(512).prefills[0]
    _begin(sched, seq)
    assert seq.computed == 64
    sched.remove(seq)
    sched.add(_req(2, 0, list(range(500, 620))))  # 8 blocks: evicts every cached one
    _admit_fully(sched, sched.schedule(512))
    assert sched.pool.num_cached == 7  # its own full blocks, now keyed
    sched.remove(sched.decoding[0])
    sched.add(_req(3, 0, prompt + [3]))
    seq = sched.schedule(512).prefills[0]
    _begin(sched, seq)
    assert seq.computed == 0


def test_without_prefix_caching_nothing_is_shared():
    sched = _sched(prefix_caching=False)
    for i in range(2):
        sched.add(_req(i, 0, list(range(100))))
        _admit_fully(sched, sched.schedule(512))
    a, b = sched.decoding
    assert not set(a.blocks) & set(b.blocks) and sched.pool.num_cached == 0


def test_when_blocks_run_out_the_newest_sequence_is_preempted_and_later_replays():
    sched = _sched(blocks=12)
    for i in range(3):
        sched.add(_req(i, 60))  # 4 blocks each: all 12
    for _ in range(3):
        _admit_fully(sched, sched.schedule(512))
    assert sched.pool.num_free == 0 and len(sched.decoding) == 3
    oldest, _, newest = sorted(sched.decoding, key=lambda s: s.order)
    for _ in range(5):  # positions 60..63 fill their 4th blocks; position 64 needs a 5th
        plan = sched.schedule(512)
        _decode(sched, plan.decodes)
    assert [s.request.request_id for s in sched.waiting] == ["r2"] and sched.preempted == 1
    assert newest.computed == 0 and newest.blocks == [] and newest.output_ids == [1, 2, 2, 2, 2]
    # the others finish; the preempted one comes back, finds its prompt blocks cached, and
    # replays its generated positions through decode steps without sampling again
    for seq in list(sched.decoding):
        sched.remove(seq)
    plan = sched.schedule(512)
    assert newest.computed == 32  # two of its blocks were taken by the others; the first two still cached
    assert plan.prefills == [newest]
    _prefill(sched, newest, 512)
    assert newest in sched.decoding and newest.output_ids == [1, 2, 2, 2, 2] and newest.computed == 60
    replays = 0
    while newest.replaying:
        _decode(sched, sched.schedule(512).decodes)
        replays += 1
    # positions 60..63 fed again (their tokens are known); position 64 then samples as before
    assert replays == 4 and newest.output_ids == [1, 2, 2, 2, 2] and newest.computed == 64


def test_random_traffic_keeps_the_block_accounting_exact():
    rng = random.Random(3)
    sched = _sched(blocks=60, batch=6)
    shared = list(range(40))  # a common prefix in some prompts
    n = 0
    for _ in range(3000):
        op = rng.random()
        if op < 0.3:
            body = [5000 + n] * rng.randrange(1, 200)
            sched.add(_req(n, 0, (shared if rng.random() < 0.5 else []) + body))
            n += 1
        elif op < 0.8:
            budget = rng.choice([64, 256, 512])
            plan = sched.schedule(budget)
            for seq in plan.prefills:  # in order, as a step does: each fails, stays partial or completes
                if rng.random() < 0.1:
                    sched.remove(seq)
                    continue
                ran = _prefill(sched, seq, budget)
                budget -= ran
                if budget <= 0 or ran == 0:
                    break
            _decode(sched, plan.decodes)
        else:
            running = sched.decoding + sched.prefilling
            if running:
                sched.remove(rng.choice(running))
        # every block is held as often as the pool counts, and a block two sequences hold is a
        # cached (keyed, full) one
        held: dict[int, int] = {}
        for seq in sched.decoding + sched.prefilling:
            assert len(seq.blocks) * sched.block_size >= seq.computed
            for b in seq.blocks:
                held[b] = held.get(b, 0) + 1
        assert all(sched.pool._ref[b] == c for b, c in held.items())
        assert sched.pool.num_used == len(held)
        assert all(c == 1 or b in sched.pool._key_of for b, c in held.items())
        assert all(not s.blocks and s.computed == 0 for s in sched.waiting)
    assert sched.preempted > 0 and sched.prefix_hits > 0  # the traffic exercised both


def test_the_choices_of_an_n_request_fork_on_the_first_ones_blocks_and_copy_the_shared_one_on_write():
    sched = _sched()
    prompt = list(range(100, 140))  # 2 full blocks and 8 positions in a third
    for i in range(4):
        req = _req(i, 0, prompt)
        req.group = "chat-1"
        sched.add(req)
    sched.add(_req(9, 0, list(range(40))))  # another request's prompt, not a sibling
    plan = sched.schedule(40)  # one prompt's worth
    parent, = plan.prefills
    _prefill(sched, parent, 40)
    siblings = sched.waiting_siblings(parent)
    assert [s.request.request_id for s in siblings] == ["r1", "r2", "r3"]
    for child in siblings:
        sched.fork(parent, child)
        child.output_ids.append(1)
    assert [s.request.request_id for s in sched.waiting] == ["r9"]
    assert sched.pool.num_used == 3 and all(sched.pool.refs(b) == 4 for b in parent.blocks)
    # each writes position 40 into the shared third block: three copy it, the last one keeps it
    shared = parent.blocks[2]
    plan = sched.schedule(0)
    assert len(plan.copies) == 3 and len({dst for _, dst in plan.copies}) == 3
    assert all(src == shared for src, _ in plan.copies) and siblings[-1].blocks[2] == shared
    tails = {s.blocks[2] for s in [parent] + siblings}
    assert len(tails) == 4 and sched.pool.num_used == 6  # 2 shared full blocks + 4 tails, not 4 x 3
    assert all(s.blocks[:2] == parent.blocks[:2] for s in siblings)
    _decode(sched, plan.decodes)
    assert sched.schedule(0).copies == []  # no block is shared and written any more


def test_a_prompt_preempted_mid_prefill_is_counted_once_in_the_prefix_metrics():
    sched = _sched(blocks=30)
    sched.add(_req(0, 100))  # 7 blocks
    _admit_fully(sched, sched.schedule(512))
    sched.add(_req(1, 200))  # 13 blocks, in chunks of 32
    seq = sched.schedule(32).prefills[0]
    _prefill(sched, seq, 32)
    sched.preempt(seq)
    seq = sched.schedule(512).prefills[0]  # back: finds its own first blocks
    assert seq.computed == 32
    assert sched.prefix_queried == 300 and sched.prefix_hits == 0


def test_without_batch_invariant_decode_generated_blocks_are_private_to_their_sequence():
    """Where decode is not batch-invariant another sequence must not read a sequence's decoded
    K/V; the sequence itself may (they are its own numbers), and does after a preemption."""
    for key_generated in (True, False):
        sched = Scheduler(max_batch_size=4, pool=BlockPool(100, 16), prefill_chunk=16, key_generated=key_generated)
        sched.add(_req(0, 20, [7] * 20))
        _admit_fully(sched, sched.schedule(512))
        first = sched.decoding[0]
        for _ in range(40):
            _decode(sched, sched.schedule(512).decodes)
        assert len(first.block_keys) == 3  # 60 positions: 3 full blocks, 1 of prompt, 2 generated
        # the same prompt and the same tokens in another sequence
        sched.add(_req(1, 20, [7] * 20))
        _admit_fully(sched, sched.schedule(512))
        twin = sched.decoding[1]
        for _ in range(40):
            _decode(sched, sched.schedule(512).decodes)
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
    sched.add(_req(0, 20))
    _admit_fully(sched, sched.schedule(512))
    seq = sched.decoding[0]
    for _ in range(50):  # 70 positions: 4 full blocks
        _decode(sched, sched.schedule(512).decodes)
    sched.preempt(seq)
    plan = sched.schedule(512)
    assert seq in sched.decoding and plan.prefills == []  # nothing of its prompt to compute
    assert seq.computed == 64  # its 4 full blocks found again; before, without batch invariance: 16
    replays = 0
    while seq.replaying:
        _decode(sched, sched.schedule(512).decodes)
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
            req = _req(arrived, rng.randrange(20, 120))
            wanted[req.request_id] = rng.randrange(50, 300)
            sched.add(req)
            arrived += 1
        plan = sched.schedule(64)
        budget = 64
        for seq in plan.prefills:
            ran = _prefill(sched, seq, budget)
            budget -= ran
            if budget <= 0 or ran == 0:
                break
        _decode(sched, plan.decodes)
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


def test_dropping_a_waiting_request():
    sched = _sched()
    sched.add(_req(0, 5))
    sched.add(_req(1, 5))
    assert sched.drop_waiting("r1").request.request_id == "r1"
    assert sched.drop_waiting("r1") is None and len(sched.waiting) == 1


def test_releasing_a_sequence_twice_is_refused():
    sched = _sched()
    for i in range(3):
        sched.add(_req(i, 5))
    _admit_fully(sched, sched.schedule(512))
    first = sched.decoding[0]
    sched.remove(first)
    with pytest.raises(RuntimeError, match="released twice"):
        sched.remove(first)
    assert len(sched.decoding) == 2 and sched.pool.num_used == 2


def test_every_engine_error_kind_has_an_http_answer():
    from server.engine.types import EngineError, ErrorKind
    from server.errors import engine_error

    for kind in ErrorKind:
        err = engine_error(EngineError(kind, "x"))
        assert 400 <= err.status < 600 and err.type and err.code


def test_a_preempted_sequence_that_ends_while_waiting_leaves_no_private_blocks_cached():
    sched = Scheduler(max_batch_size=4, pool=BlockPool(100, 16), prefill_chunk=16, key_generated=False)
    sched.add(_req(0, 20))
    _admit_fully(sched, sched.schedule(512))
    seq = sched.decoding[0]
    for _ in range(40):
        _decode(sched, sched.schedule(512).decodes)
    sched.preempt(seq)  # its 3 full blocks stay cached: 1 of prompt, 2 private
    assert sched.pool.num_cached == 3
    sched.remove(seq)  # aborted while waiting to come back
    assert sched.pool.num_cached == 1 and sched.pool.num_free == sched.pool.capacity
    sched.add(_req(1, 20))
    _admit_fully(sched, sched.schedule(512))
    for _ in range(40):
        _decode(sched, sched.schedule(512).decodes)
    sched.preempt(sched.decoding[0])
    assert sched.drop_waiting("r1") is not None and sched.pool.num_cached == 2  # r0's and r1's prompt blocks
