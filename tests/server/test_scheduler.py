"""The scheduler alone (pure Python, no torch, no model): step plans and the slot invariant."""

import random

import pytest

from model.sampling_params import SamplingParams
from server.engine.scheduler import Scheduler
from server.engine.types import EngineRequest


def _req(i: int, prompt: int) -> EngineRequest:
    return EngineRequest(f"r{i}", [1] * prompt, [], SamplingParams(max_tokens=4), prompt)


def _admit_fully(sched: Scheduler, plan) -> None:
    """What the engine does when a planned prompt is all in the cache."""
    for seq in plan.prefills:
        seq.state = object()  # admitted: prompt_len known
        seq.prompt_len = seq.request.max_prompt_tokens
        seq.prefilled = seq.prompt_len
        sched.finish_prefill(seq)


def test_short_prompts_share_a_step_and_a_long_one_is_chunked_alone():
    sched = Scheduler(num_slots=8)
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
    sched = Scheduler(num_slots=4)
    sched.add(_req(0, 1000))
    sched.add(_req(1, 10))
    plan = sched.schedule(512)
    assert [s.request.request_id for s in plan.prefills] == ["r0"]
    seq = plan.prefills[0]
    seq.state, seq.prompt_len, seq.prefilled = object(), 1000, 512
    plan = sched.schedule(512)
    assert plan.prefills[0] is seq  # the long one goes on: 488 left, and the 24 to spare fit r1
    assert [s.request.request_id for s in plan.prefills] == ["r0", "r1"]
    seq.prefilled = 1000
    assert sched.finish_prefill(seq) is None  # it was admitted into the slot it decodes in


def test_admission_stops_when_slots_run_out():
    sched = Scheduler(num_slots=2)
    for i in range(4):
        sched.add(_req(i, 10))
    plan = sched.schedule(512)
    assert len(plan.prefills) == 2 and len(sched.waiting) == 2 and sched.num_free_slots == 0
    _admit_fully(sched, plan)
    assert sched.schedule(512).prefills == []


def test_random_admissions_finishes_and_moves_keep_decoding_sequences_in_slots_0_to_b():
    rng = random.Random(3)
    sched = Scheduler(num_slots=6)
    where: dict[str, int] = {}  # request -> the slot its cache rows are in, following every move
    n = 0
    for _ in range(2000):
        op = rng.random()
        if op < 0.35:
            sched.add(_req(n, rng.randrange(1, 300)))
            n += 1
        elif op < 0.7:
            budget = rng.choice([64, 256, 512])
            plan = sched.schedule(budget)
            for seq in plan.prefills:  # run in order, as a step does: each fails, stays partial or completes
                where.setdefault(seq.request.request_id, seq.slot)
                if rng.random() < 0.15:
                    sched.remove(seq)
                    del where[seq.request.request_id]
                    continue
                seq.state, seq.prompt_len = object(), seq.request.max_prompt_tokens
                ran = min(budget, seq.prompt_len - seq.prefilled)
                seq.prefilled += ran
                budget -= ran
                if seq.prefilled < seq.prompt_len:
                    break  # the budget is spent
                move = sched.finish_prefill(seq)
                if move:
                    assert where[seq.request.request_id] == move[0]
                    where[seq.request.request_id] = move[1]
        else:
            running = sched.decoding + sched.prefilling
            if running:
                seq = rng.choice(running)
                move = sched.remove(seq)
                del where[seq.request.request_id]
                if move:
                    moved = sched.decoding[move[1]]
                    assert where[moved.request.request_id] == move[0]
                    where[moved.request.request_id] = move[1]
        assert [s.slot for s in sched.decoding] == list(range(len(sched.decoding)))
        used = [s.slot for s in sched.decoding + sched.prefilling]
        assert len(set(used)) == len(used) and sched.num_free_slots + len(used) == sched.num_slots
        assert all(where[s.request.request_id] == s.slot for s in sched.decoding + sched.prefilling)


def test_dropping_a_waiting_request():
    sched = Scheduler(num_slots=1)
    sched.add(_req(0, 5))
    sched.add(_req(1, 5))
    assert sched.drop_waiting("r1").request_id == "r1"
    assert sched.drop_waiting("r1") is None and len(sched.waiting) == 1


def test_releasing_a_sequence_twice_is_refused_not_silently_moving_another():
    sched = Scheduler(num_slots=3)
    for i in range(3):
        sched.add(_req(i, 5))
    _admit_fully(sched, sched.schedule(512))
    first = sched.decoding[0]
    assert sched.remove(first) == (2, 0)
    with pytest.raises(RuntimeError, match="released twice"):
        sched.remove(first)
    assert [s.slot for s in sched.decoding] == [0, 1]


def test_every_engine_error_kind_has_an_http_answer():
    from server.engine.types import EngineError, ErrorKind
    from server.errors import engine_error

    for kind in ErrorKind:
        err = engine_error(EngineError(kind, "x"))
        assert 400 <= err.status < 600 and err.type and err.code
