"""The static (graph-capturable) decode step against the eager one, on the CPU: padding rows,
the null block and key-span buckets. Capture and replay themselves run in tests/model/test_gpu.py."""

import pytest
import torch

from model.decode_graphs import DecodeGraphs, batch_buckets


def test_batch_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(16) == [1, 2, 4, 8, 16]
    assert batch_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert batch_buckets(64)[-3:] == [48, 56, 64]


def _prefilled(llm, hidden, lengths, num_slots, max_len):
    torch.manual_seed(0)
    embeds = torch.randn(len(lengths), max(lengths), hidden)
    cache = llm.new_cache(num_slots=num_slots, max_len=max_len, dtype=torch.float32, device="cpu")
    for slot, n in enumerate(lengths):
        llm.prefill(embeds[slot, :n], cache, slot=slot, start=0)
    return cache


@pytest.mark.parametrize("batch", [1, 3, 5])
def test_static_decode_matches_eager_and_spares_other_blocks(tiny_lm, batch):
    llm, cfg = tiny_lm.model.llm, tiny_lm.cfg
    lengths = [40 + 67 * i for i in range(batch)]  # spans 1, 2 and 3 blocks of 128 keys
    slots = 8  # batch 3 pads to 4, batch 5 to 8
    cache_a = _prefilled(llm, cfg.hidden_size, lengths, slots, 320)
    cache_b = _prefilled(llm, cfg.hidden_size, lengths, slots, 320)
    tables = [cache_b.slot_table(i) for i in range(batch)]
    mine = [0] + [blk for t in tables for blk in t]  # the null block and the batch's blocks
    others = [blk for blk in range(cache_b.num_blocks) if blk not in mine]
    bystander = cache_b.k[:, :, others].clone()  # padding rows must not write there
    graphs = DecodeGraphs(llm, cache_b, max_batch=8, max_len=320, span_block=128)
    assert not graphs.use_graphs and graphs.max_batch == 8
    ids, positions = list(range(5, 5 + batch)), list(lengths)
    for _ in range(3):  # greedy steps: both paths pick the same tokens from the same logits
        eager = llm.logits(llm.decode(llm.embed(torch.tensor(ids)), positions, cache_a))
        static = graphs(ids, positions, tables)
        assert static.shape == (batch, cfg.vocab_size)
        assert torch.allclose(static, eager, atol=1e-4), (static - eager).abs().max()
        ids = eager.argmax(-1).tolist()
        positions = [p + 1 for p in positions]
    assert torch.equal(cache_b.k[:, :, others], bystander)
    real = [blk for t in tables for blk in t]
    assert torch.allclose(cache_b.k[:, :, real], cache_a.k[:, :, real], atol=1e-5)
    assert torch.allclose(cache_b.v[:, :, real], cache_a.v[:, :, real], atol=1e-5)


def test_span_is_bucketed_and_bounded(tiny_lm):
    llm = tiny_lm.model.llm
    cache = llm.new_cache(num_slots=3, max_len=300, dtype=torch.float32, device="cpu")
    graphs = DecodeGraphs(llm, cache, max_batch=2, max_len=300, span_block=128)
    assert graphs.max_len == 304  # whole blocks of 16
    assert graphs.span([0]) == 128 and graphs.span([127]) == 128 and graphs.span([128, 3]) == 256
    assert graphs.span([299]) == 304  # never past the longest sequence
    with pytest.raises(ValueError):
        graphs([1, 2, 3], [4, 5, 6], [[1], [2], [3]])  # a batch of 2 at most
    with pytest.raises(ValueError):
        graphs([1], [304], [[1]])


def test_shapes_cover_every_batch_and_position(tiny_lm):
    llm = tiny_lm.model.llm
    cache = llm.new_cache(num_slots=12, max_len=300, dtype=torch.float32, device="cpu")
    graphs = DecodeGraphs(llm, cache, max_batch=11, max_len=300, span_block=64)
    shapes = set(graphs.shapes())
    assert len(shapes) == len(graphs.buckets) * 5  # spans 64, 128, 192, 256, 304
    for b in range(1, 12):
        for p in range(300):
            assert (graphs.bucket(b), graphs.span([p] * b)) in shapes
    assert graphs.capture_all() == 0  # nothing to capture without CUDA graphs


def _failing_capture(monkeypatch, graphs: DecodeGraphs) -> list:
    """Make `graphs` capture on the CPU: the real capture runs (tables pointed at the null block) and
    fails where it first needs CUDA, as a capture failing for want of memory would."""
    calls = []
    real = graphs._capture

    def capture(nb, span):
        calls.append((nb, span))
        return real(nb, span)

    graphs.use_graphs = True
    monkeypatch.setattr(graphs, "_capture", capture)
    return calls


def test_a_failed_capture_runs_that_shape_eagerly_and_is_not_retried(tiny_lm, monkeypatch):
    llm, cfg = tiny_lm.model.llm, tiny_lm.cfg
    lengths = [40, 90]
    cache_a = _prefilled(llm, cfg.hidden_size, lengths, 4, 320)
    cache_b = _prefilled(llm, cfg.hidden_size, lengths, 4, 320)
    tables = [cache_b.slot_table(i) for i in range(2)]
    graphs = DecodeGraphs(llm, cache_b, max_batch=4, max_len=320, span_block=128)
    calls = _failing_capture(monkeypatch, graphs)
    ids, positions = [5, 6], list(lengths)
    for _ in range(3):
        eager = llm.logits(llm.decode(llm.embed(torch.tensor(ids)), positions, cache_a))
        static = graphs(ids, positions, tables)  # before: the capture's error was the forward's
        assert torch.allclose(static, eager, atol=1e-4)
        ids, positions = eager.argmax(-1).tolist(), [p + 1 for p in positions]
    assert calls == [(2, 128)]  # once for the shape, then eager
    assert graphs.eager_shapes == {(2, 128)} and graphs.num_graphs == 0


def test_a_capture_failing_while_serving_blames_no_request(tiny_lm, monkeypatch):
    """The engine's batch moves into a shape whose capture fails: every request completes as it
    would have, nobody is bisected as a culprit, and the engine keeps its health."""
    import asyncio

    from model.sampling import SamplingParams
    from server.engine.client import Engine
    from server.engine.runner import ModelRunner
    from server.engine.types import EngineRequest

    runner = ModelRunner(tiny_lm, max_batch_size=4, max_model_len=256)
    prompts = [[1] + [(7 * i + j) % 200 + 5 for j in range(12)] for i in range(3)]

    def run(engine):
        async def main():
            streams = [engine.submit(EngineRequest(f"r{i}", p, [], SamplingParams(max_tokens=6, temperature=0,
                                                                                 ignore_eos=True), len(p)))
                       for i, p in enumerate(prompts)]

            async def collect(stream):
                events = [ev async for ev in stream]
                assert events[-1].error is None, events[-1].error
                return [t for ev in events for t in ev.token_ids]

            return await asyncio.gather(*(collect(s) for s in streams))
        return asyncio.run(main())

    with Engine(runner) as engine:
        expected = run(engine)
        runner.graphs = DecodeGraphs(runner.llm, runner.cache, max_batch=4, max_len=256, use_graphs=False)
        calls = _failing_capture(monkeypatch, runner.graphs)
        assert run(engine) == expected
        assert calls and engine.alive and engine.executor.failed_steps == 0
