"""The engine on its own thread, driven through submit() and its event streams."""

import asyncio
import os
import time

import pytest

from model.sampling import SamplingParams
from server.engine.client import Engine
from server.engine.runner import ModelRunner
from server.engine.types import EngineRequest


def _run(engine: Engine, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    async def main():
        streams = [engine.submit(EngineRequest(f"r{i}", ids, [], SamplingParams(max_tokens=max_tokens, temperature=0,
                                                                                   ignore_eos=True), len(ids)))
                   for i, ids in enumerate(prompts)]

        async def collect(stream):
            return [t async for ev in stream for t in ev.token_ids]

        return await asyncio.gather(*(collect(s) for s in streams))

    return asyncio.run(main())


def test_short_prompts_share_one_prefill_step_and_decode_as_alone(tiny_lm):
    prompts = [[1] + [(11 * i + j) % 200 + 5 for j in range(20)] for i in range(8)]
    with Engine(ModelRunner(tiny_lm, max_batch_size=8, max_model_len=128), max_batch_size=8,
                prefill_chunk=512) as engine:
        together = _run(engine, prompts, 3)
        # 8 prompts of 21 positions fit one 512-position step: admitted in <= 2 steps (the engine
        # may start on the first before the others arrive), not one step each.
        assert engine.steps <= 4
        alone = [_run(engine, [p], 3)[0] for p in prompts[:3]]
    assert together[:3] == alone


def test_long_prompt_is_chunked_and_others_wait_their_turn(tiny_lm):
    long = [1] + [(7 * j) % 200 + 5 for j in range(99)]  # 100 positions: 4 chunks of 32
    short = [1] + [(5 * j) % 200 + 5 for j in range(9)]
    with Engine(ModelRunner(tiny_lm, max_batch_size=4, max_model_len=256), max_batch_size=4,
                prefill_chunk=32) as engine:
        both = _run(engine, [long, short], 4)
        steps = engine.steps
        alone = [_run(engine, [p], 4)[0] for p in (long, short)]
    assert both == alone
    assert steps >= 4  # the long prompt took one chunk per step


def test_warm_up_falls_back_to_eager_kernels_when_compiling_fails(tiny_lm, monkeypatch):
    from model.pointwise import PointwiseKernels

    def broken(*args):
        raise RuntimeError("compiler not found")  # what a torch.compile failure looks like at the first call

    runner = ModelRunner(tiny_lm, max_batch_size=2, max_model_len=64)
    monkeypatch.setattr(runner.llm, "kernels", PointwiseKernels(add_rms_norm=broken, compiled=True))
    runner.warm_up()
    assert not runner.llm.kernels.compiled and runner.llm.kernels.add_rms_norm is not broken


def test_warm_up_compiles_every_shape_serving_uses(tiny_lm, c_compiler):
    """With compiled kernels (CUDA's default; here on the CPU) no request may pay for a compile:
    warm-up covers prefill chunks, batch-1 and batched decode (an expanded, stride-0 warm-up
    batch once left a compile for the first batched step)."""
    from torch._dynamo.utils import counters

    runner = ModelRunner(tiny_lm, max_batch_size=4, max_model_len=128)
    runner.llm.compile_pointwise()
    try:
        runner.warm_up()
        compiled = counters["stats"]["unique_graphs"]
        with Engine(runner, max_batch_size=4, prefill_chunk=16) as engine:
            _run(engine, [[1] + [(3 * i + j) % 200 + 5 for j in range(9 + 13 * i)] for i in range(4)], 5)
            _run(engine, [[1, 7, 9]], 3)
        assert counters["stats"]["unique_graphs"] == compiled
    finally:
        runner.llm.compile_pointwise(False)


@pytest.mark.skipif(not hasattr(os, "getpriority"), reason="POSIX priorities")
def test_the_vision_thread_runs_at_the_niceness_asked_and_the_engine_thread_does_not(tiny_lm):
    engine = Engine(ModelRunner(tiny_lm, max_batch_size=2, max_model_len=128), max_batch_size=2, vision_nice=7)
    base = os.getpriority(os.PRIO_PROCESS, 0)
    with engine:
        assert _run(engine, [[1, 5, 6, 7]], 3)[0]  # the engine still serves
        deadline = time.monotonic() + 10
        while os.getpriority(os.PRIO_PROCESS, engine.vision.thread.native_id) != min(19, base + 7):
            assert time.monotonic() < deadline, "the vision thread's niceness never changed"
            time.sleep(0.01)
        assert os.getpriority(os.PRIO_PROCESS, engine._thread.native_id) == base


def _decode(tiny_lm, batch, delays=None, prefill_chunk=512) -> list[list[tuple[int, float]]]:
    """Run [(prompt ids, SamplingParams)] through a 4-slot engine, request i submitted after
    delays[i] seconds; -> each request's [(token, logprob)]."""
    with Engine(ModelRunner(tiny_lm, max_batch_size=4, max_model_len=128), max_batch_size=4,
                prefill_chunk=prefill_chunk) as engine:
        async def one(i, ids, params, delay):
            await asyncio.sleep(delay)
            stream = engine.submit(EngineRequest(f"r{i}", ids, [], params, len(ids)))
            return [(t, lp.logprob) async for ev in stream for t, lp in zip(ev.token_ids, ev.logprobs)]

        async def main():
            return await asyncio.gather(*(one(i, ids, p, d) for i, ((ids, p), d)
                                          in enumerate(zip(batch, delays or [0] * len(batch)))))

        return asyncio.run(main())


def test_a_sequence_moved_when_an_earlier_one_finishes_keeps_its_newest_cache_entry(tiny_lm):
    # Finishing a sequence moves the batch's last one into its slot. That must happen after the
    # last one's token of the same step is counted, or the cache entry that step wrote is left
    # behind and every later token of the moved sequence reads a stale key.
    def greedy(n):
        return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, logprobs=True)

    a = [1] + [(7 * j) % 180 + 5 for j in range(20)]
    b = [1] + [(13 * j) % 190 + 9 for j in range(30)]
    c = [1] + [(5 * j) % 170 + 11 for j in range(25)]
    alone_b, alone_c = _decode(tiny_lm, [(b, greedy(10))])[0], _decode(tiny_lm, [(c, greedy(12))])[0]
    # a and b share the first steps' batch; a ends first and c (the last) moves into its slot
    got = _decode(tiny_lm, [(a, greedy(3)), (b, greedy(10)), (c, greedy(12))])
    assert got[1] == alone_b and got[2] == alone_c


def test_every_request_decodes_as_alone_under_churn(tiny_lm):
    # Arrivals, chunked prefills, finishes at different steps, queueing for slots and the slot
    # moves all of that causes: each request's tokens and logprobs must be what it gets alone.
    import random

    rng = random.Random(11)
    # greedy, and seeded sampling with and without penalties (each request keeps its own state)
    reqs = [([1] + [rng.randrange(5, 250) for _ in range(rng.randrange(3, 70))],
             SamplingParams(max_tokens=rng.randrange(1, 14), ignore_eos=True, logprobs=True,
                            **({"temperature": 0} if i % 3 == 0 else
                               {"temperature": 0.8, "seed": i, "top_p": 0.9, "frequency_penalty": 0.5 * (i % 2)})))
            for i in range(10)]

    def run(batch, delays):
        return _decode(tiny_lm, batch, delays, prefill_chunk=32)

    alone = [run([r], [0])[0] for r in reqs]
    for _ in range(2):
        delays = [rng.choice([0, 0, 0.002, 0.005, 0.01]) for _ in reqs]
        assert run(reqs, delays) == alone


def _blocking_hook(stage_to_block: str):
    """A fault hook that holds the engine (or vision) thread in `stage_to_block` until released."""
    import threading

    entered, release = threading.Event(), threading.Event()

    def hook(stage, requests):
        if stage == stage_to_block:
            entered.set()
            assert release.wait(10)

    return hook, entered, release


def _idle(engine: Engine) -> bool:
    s = engine.scheduler
    return (engine.num_requests == 0 and engine.vision.pending == 0 and s.num_running == 0 and not s.waiting
            and s.pool.num_used == 0 and s.num_sequences == 0)


def test_an_abort_during_the_vision_stage_frees_everything_and_runs_no_prefill(tiny_lm, ironing):
    from model.processor import prepare_image

    image = prepare_image(ironing.resize((400, 300)), tiny_lm.cfg, "d1", norm=tiny_lm.image_norm)
    ids = [1, 5, -200, 6, 7]
    engine = Engine(ModelRunner(tiny_lm, max_batch_size=2, max_model_len=2048), max_batch_size=2)
    hook, entered, release = _blocking_hook("vision")
    engine.executor.fault_hook = hook
    engine.start()
    try:
        async def main():
            stream = engine.submit(EngineRequest("img", ids, [image], SamplingParams(max_tokens=4, temperature=0),
                                                 2000))
            assert await asyncio.to_thread(entered.wait, 10)  # in the vision stage now
            await stream.aclose()  # the client went away
            steps = engine.steps
            release.set()
            deadline = time.monotonic() + 10
            while not _idle(engine):
                assert time.monotonic() < deadline, "the aborted request was never cleaned up"
                await asyncio.sleep(0.01)
            assert engine.steps == steps  # its features were dropped, never prefilled
            engine.executor.fault_hook = None
            return [t async for ev in engine.submit(EngineRequest("next", [1, 5, 6], [], SamplingParams(
                max_tokens=3, temperature=0, ignore_eos=True), 3)) for t in ev.token_ids]

        assert len(asyncio.run(main())) == 3
    finally:
        release.set()
        engine.stop()


def test_an_abort_during_a_chunked_prefill_frees_the_slot_mid_prompt(tiny_lm):
    prompt = [1] + [(7 * j) % 200 + 5 for j in range(199)]  # 200 positions: 13 chunks of 16
    engine = Engine(ModelRunner(tiny_lm, max_batch_size=2, max_model_len=512), max_batch_size=2, prefill_chunk=16)
    chunks = []
    run_chunk = engine.runner.prefill_chunk
    engine.runner.prefill_chunk = lambda seq, *a, **k: chunks.append(seq.request.request_id) or run_chunk(seq, *a, **k)
    hook, entered, release = _blocking_hook("prefill")
    engine.executor.fault_hook = hook
    engine.start()
    try:
        async def main():
            stream = engine.submit(EngineRequest("long", prompt, [], SamplingParams(max_tokens=4, temperature=0),
                                                 len(prompt)))
            assert await asyncio.to_thread(entered.wait, 10)  # admitted: its first chunk is next
            await stream.aclose()
            release.set()
            deadline = time.monotonic() + 10
            while not _idle(engine):
                assert time.monotonic() < deadline, "the aborted prefill kept its slot"
                await asyncio.sleep(0.01)
            engine.executor.fault_hook = None
            return [t async for ev in engine.submit(EngineRequest("next", prompt[:20], [], SamplingParams(
                max_tokens=3, temperature=0, ignore_eos=True), 20)) for t in ev.token_ids]

        assert len(asyncio.run(main())) == 3
    finally:
        release.set()
        engine.stop()
    assert 1 <= chunks.count("long") < 13  # stopped mid-prompt


def _collect(engine: Engine, requests: list[EngineRequest]) -> list[list]:
    async def main():
        streams = [engine.submit(r) for r in requests]

        async def one(stream):
            return [ev async for ev in stream]

        return await asyncio.gather(*(one(s) for s in streams))

    return asyncio.run(main())


def _long(i: int) -> EngineRequest:
    return EngineRequest(f"r{i}", [1, 5 + i, 6, 7], [], SamplingParams(max_tokens=200, temperature=0,
                                                                       ignore_eos=True), 4)


def test_a_model_that_fails_every_step_stops_the_engine_instead_of_blaming_one_request_a_step(tiny_lm):
    engine = Engine(ModelRunner(tiny_lm, max_batch_size=4, max_model_len=256), max_batch_size=4)

    def dead_device(stage, requests):
        if stage == "decode":
            raise RuntimeError("CUDA error: device-side assert")

    engine.executor.fault_hook = dead_device
    with engine:
        results = _collect(engine, [_long(i) for i in range(4)])
        assert all(events[-1].finish_reason == "error" for events in results)
        deadline = time.monotonic() + 10
        while engine.alive:
            assert time.monotonic() < deadline, "a model failing every step left the engine up"
            time.sleep(0.01)


def test_when_the_engine_loop_itself_dies_every_stream_ends_instead_of_hanging(tiny_lm, monkeypatch):
    engine = Engine(ModelRunner(tiny_lm, max_batch_size=4, max_model_len=256), max_batch_size=4)
    with engine:
        def broken_remove(*args):
            raise RuntimeError("bookkeeping lost")

        async def main():
            streams = [engine.submit(_long(i)) for i in range(3)]
            firsts = [await s.__anext__() for s in streams]  # all three decoding
            assert all(ev.finish_reason is None for ev in firsts)
            monkeypatch.setattr(engine.scheduler, "remove", broken_remove)
            await streams[0].aclose()  # its release raises on the engine thread, outside any step

            async def rest(stream):
                return [ev async for ev in stream]

            return await asyncio.wait_for(asyncio.gather(rest(streams[1]), rest(streams[2])), 20)

        ends = asyncio.run(main())
        assert all(events[-1].finish_reason == "error" and events[-1].error.message == "the engine stopped"
                   for events in ends)
        assert not engine.alive


def test_the_choices_of_an_n_request_share_one_vision_encoding(tiny_lm, ironing):
    from model.processor import prepare_image

    image = prepare_image(ironing.resize((400, 300)), tiny_lm.cfg, "digest-n3", norm=tiny_lm.image_norm)
    runner = ModelRunner(tiny_lm, max_batch_size=4, max_model_len=2048, vision_cache_bytes=64 << 20)
    calls = []
    encode_images = runner.model.encode_images
    runner.model.encode_images = lambda *a: calls.append(1) or encode_images(*a)
    with Engine(runner, max_batch_size=4) as engine:
        params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
        results = _collect(engine, [EngineRequest(f"c{i}", [1, 5, -200, 6], [image], params, 2000) for i in range(3)])
    tokens = [[t for ev in events for t in ev.token_ids] for events in results]
    assert len(calls) == 1 and tokens[0] == tokens[1] == tokens[2] and len(tokens[0]) == 4


def test_a_stop_check_that_fails_for_one_sequence_fails_only_that_one(tiny_lm):
    runner = ModelRunner(tiny_lm, max_batch_size=4, max_model_len=256)
    engine = Engine(runner, max_batch_size=4)
    start = engine.output.start

    def start_with_a_broken_detokenizer(seq):
        start(seq)
        if seq.request.request_id == "r1":  # breaks at its third token: in a decode step
            add, calls = seq.output.detok.add, []

            def broken(token):
                calls.append(token)
                if len(calls) >= 3:
                    raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "simulated")
                return add(token)

            seq.output.detok.add = broken

    engine.output.start = start_with_a_broken_detokenizer
    with engine:
        together = _collect(engine, [_long(i) for i in range(3)])
        alone = _collect(engine, [_long(0)])[0]
    assert together[1][-1].finish_reason == "error" and together[1][-1].error.message == "model error during decoding"
    assert sum(len(ev.token_ids) for ev in together[1]) == 2
    for events in (together[0], together[2]):
        assert events[-1].finish_reason == "length" and sum(len(ev.token_ids) for ev in events) == 200
    assert [t for ev in together[0] for t in ev.token_ids] == [t for ev in alone for t in ev.token_ids]


def test_stopping_skips_queued_vision_work_and_ends_every_stream(tiny_lm, ironing):
    from model.processor import prepare_image

    image = prepare_image(ironing.resize((300, 200)), tiny_lm.cfg, None, norm=tiny_lm.image_norm)
    engine = Engine(ModelRunner(tiny_lm, max_batch_size=2, max_model_len=2048), max_batch_size=2)

    def slow_vision(stage, requests):
        if stage == "vision":
            time.sleep(1.0)

    engine.executor.fault_hook = slow_vision
    engine.start()

    async def main():
        streams = [engine.submit(EngineRequest(f"v{i}", [1, -200, 5], [image], SamplingParams(max_tokens=2), 2000))
                   for i in range(6)]
        await asyncio.sleep(0.2)  # the first is being encoded, five wait in the vision queue
        t0 = time.monotonic()
        await asyncio.to_thread(engine.stop)
        took = time.monotonic() - t0

        async def last(stream):
            return [ev async for ev in stream][-1]

        ends = await asyncio.wait_for(asyncio.gather(*(last(s) for s in streams)), 10)
        return took, ends

    took, ends = asyncio.run(main())
    assert took < 3, f"stop waited {took:.1f} s for queued vision work"
    assert all(ev.finish_reason == "error" for ev in ends)
