"""Image features waiting for their requests to start are bounded in bytes (`--vision-queue-mb`),
and pixel arrays are dropped once the features exist."""

from __future__ import annotations

import asyncio

from model.processor import prepare_image
from model.sampling import SamplingParams
from server.engine.client import Engine
from server.engine.runner import ModelRunner
from server.engine.types import EngineRequest


def test_a_deep_queue_of_image_requests_holds_at_most_the_budget_of_features(tiny_lm, ironing):
    images = [prepare_image(ironing.resize((400 + 16 * i, 300)), tiny_lm.cfg, f"d{i}", norm=tiny_lm.image_norm)
              for i in range(6)]
    per_request = sum(f.nbytes for f in ModelRunner(tiny_lm, max_batch_size=1, max_model_len=2048).encode(images[:1]))
    budget = 2 * per_request
    held, pixels_left = [], []

    def observe(stats):  # on the engine thread, after each step: what requests not started hold
        waiting = [s.request for s in engine.scheduler.waiting if s.request.features is not None]
        held.append(sum(f.nbytes for r in waiting for f in r.features))
        pixels_left.extend(img.pixels is not None for r in waiting for img in r.images)
        assert stats.vision_features_bytes <= budget + per_request

    # one slot: a long text stream holds it while the image requests queue up behind it
    engine = Engine(ModelRunner(tiny_lm, max_batch_size=1, max_model_len=2048), max_batch_size=1,
                    vision_queue_bytes=budget, on_stats=observe)
    with engine:
        requests = [EngineRequest(f"img{i}", [1, 5, -200, 6, 7], [im], SamplingParams(max_tokens=2, temperature=0),
                                  2000) for i, im in enumerate(images)]
        async def main():
            text = engine.submit(EngineRequest("text", [1, 5, 6], [], SamplingParams(max_tokens=300, temperature=0,
                                                                                     ignore_eos=True), 3))
            first = await anext(text)
            assert first.error is None
            streams = [engine.submit(r) for r in requests]

            async def collect(stream):
                events = [ev async for ev in stream]
                assert events[-1].error is None, events[-1].error
                return events

            await asyncio.gather(collect(text), *(collect(s) for s in streams))

        asyncio.run(main())
    assert max(held) >= per_request  # requests did queue with their features
    assert max(held) <= budget + per_request, (max(held), budget)  # before: all six at once
    assert engine.vision.budget.peak <= budget + per_request
    assert not any(pixels_left)  # pixels go once the features exist
    assert all(img.pixels is None for r in requests for img in r.images)


def test_features_several_requests_share_count_once(tiny_lm, ironing):
    """The choices of an n>1 request hold the same feature objects: they take the budget once."""
    from server.engine.types import EngineRequest as Req
    from server.engine.vision import FeatureBudget

    image = prepare_image(ironing.resize((400, 300)), tiny_lm.cfg, "shared", norm=tiny_lm.image_norm)
    feats = ModelRunner(tiny_lm, max_batch_size=1, max_model_len=2048).encode([image])
    budget = FeatureBudget(10 << 20, lambda rid: True)
    for i in range(4):
        r = Req(f"c-{i}", [1, -200, 5], [image], SamplingParams(max_tokens=2), 2000)
        r.features = feats
        budget.add(r, views=image.pixels.shape[0])
    assert budget.held == sum(f.nbytes for f in feats)
