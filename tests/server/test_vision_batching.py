"""The vision stage encodes the images of requests queued together as one batch
(`--vision-batch-views`), and each request gets exactly the features encoding it alone gives."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from model.processor import prepare_image
from model.sampling import SamplingParams
from server.engine.client import Engine
from server.engine.runner import ModelRunner
from server.engine.types import EngineRequest
from tests.server.faults import POISON


@pytest.fixture(scope="module")
def images(tiny_lm, ironing):
    sizes = [(400, 300), (336, 336), (700, 300), (300, 650), (500, 500)]
    return [prepare_image(ironing.resize(s), tiny_lm.cfg, f"b{i}", norm=tiny_lm.image_norm) for i, s in enumerate(sizes)]


def _same(a, b) -> bool:
    return all((x is None and y is None) or torch.equal(x, y)
               for x, y in ((a.global_rows, b.global_rows), (a.local_rows, b.local_rows))) and a.grid == b.grid


def test_a_batch_of_requests_gets_the_features_each_would_get_alone(tiny_lm, images):
    runner = ModelRunner(tiny_lm, max_batch_size=4, max_model_len=2048)  # no vision cache: every image encoded
    requests = [[images[0], images[1]], [images[2]], [images[3], images[4], images[0]]]
    together = runner.encode_many(requests)
    for imgs, got in zip(requests, together):
        alone = runner.encode(imgs)
        assert len(got) == len(alone) and all(_same(a, b) for a, b in zip(got, alone))


def _engine(tiny_lm, **kw) -> tuple[Engine, threading.Event]:
    """An engine whose vision stage holds its first request until released: the rest queue up."""
    release = threading.Event()
    first = []

    def hook(stage, requests):
        if stage == "vision" and not first:
            first.append(True)
            release.wait(10)
        if stage == "vision" and any(r.params.seed == POISON["vision"] for r in requests):
            raise RuntimeError("simulated vision failure")

    engine = Engine(ModelRunner(tiny_lm, max_batch_size=8, max_model_len=2048), fault_hook=hook, **kw)
    return engine, release


def _serve(engine, release, images, seeds):
    async def main():
        streams = [engine.submit(EngineRequest(f"r{i}", [1, 5, -200, 6, 7 + i], [im],
                                               SamplingParams(max_tokens=4, temperature=0, seed=seed), 3000))
                   for i, (im, seed) in enumerate(zip(images, seeds))]
        await asyncio.sleep(0.3)  # all queued behind the held one
        release.set()

        async def collect(stream):
            events = [ev async for ev in stream]
            return events[-1].error, [t for ev in events for t in ev.token_ids]

        return await asyncio.gather(*(collect(s) for s in streams))

    with engine:
        return asyncio.run(main())


def test_queued_image_requests_share_a_vision_pass_and_answer_as_alone(tiny_lm, images):
    engine, release = _engine(tiny_lm, vision_batch_views=64)
    batched = _serve(engine, release, images, [1] * 5)
    assert max(engine.vision.batches) > 1  # the 4 queued behind the first went through together
    engine, release = _engine(tiny_lm, vision_batch_views=1)  # one request a pass
    alone = _serve(engine, release, images, [1] * 5)
    assert max(engine.vision.batches) == 1
    assert batched == alone and all(err is None for err, _ in batched)


def test_a_request_that_breaks_a_batch_fails_alone(tiny_lm, images):
    engine, release = _engine(tiny_lm, vision_batch_views=64)
    out = _serve(engine, release, images, [1, 1, POISON["vision"], 1, 1])
    assert out[2][0] is not None and out[2][0].message == "model error during vision encoding"
    assert [err for i, (err, _) in enumerate(out) if i != 2] == [None] * 4


def test_the_views_budget_bounds_a_pass(tiny_lm, images):
    engine, release = _engine(tiny_lm, vision_batch_views=8)
    _serve(engine, release, images, [1] * 5)
    views = [im.pixels.shape[0] for im in images]
    assert max(engine.vision.batches) < 5 and sum(views) > 8  # the five did not fit one pass
