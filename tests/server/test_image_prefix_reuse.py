"""Image rows in the prefix cache: a prompt's image rows are reused by the image's content and the
local tokens its question kept, and by nothing else (README, "Prefix reuse")."""

from __future__ import annotations

import asyncio

import pytest

from model.config import IMAGE_TOKEN_INDEX
from model.processor import prepare_image
from model.sampling import SamplingParams
from server.engine.client import Engine
from server.engine.runner import ModelRunner
from server.engine.types import EngineRequest

TEXT = [1] + [(13 * j) % 180 + 7 for j in range(40)]  # 41 positions before the image: 2 full blocks


@pytest.fixture(scope="module")
def served(tiny_lm, ironing):
    hits: list[int] = []
    # the prefill chunk is one block here, so a hit is seen block by block (served, hits end on a
    # chunk boundary: 512 positions by default)
    engine = Engine(ModelRunner(tiny_lm, max_batch_size=2, max_model_len=4096), max_batch_size=2, prefill_chunk=16,
                    on_stats=lambda st: hits.append(st.prefix_hit_tokens))
    engine.start()
    images = {name: prepare_image(ironing.resize(size), tiny_lm.cfg, name, norm=tiny_lm.image_norm)
              for name, size in (("x", (500, 340)), ("y", (500, 341)))}
    runs = iter(range(1000))

    def run(image: str, question: list[int]):
        """(prompt positions reused from the cache, the image's report, the tokens)."""
        ids = TEXT + [IMAGE_TOKEN_INDEX] + question
        req = EngineRequest(f"r{next(runs)}", ids, [images[image]], SamplingParams(max_tokens=4, temperature=0,
                                                                                   ignore_eos=True), 4000)

        async def main():
            return [ev async for ev in engine.submit(req)]

        hits.clear()
        events = asyncio.run(main())
        assert events[-1].error is None, events[-1].error
        report = next(ev.images for ev in events if ev.images)[0]
        return sum(hits), report, [t for ev in events for t in ev.token_ids], events[-1].prompt_tokens

    yield run
    engine.stop()


Q1 = [(5 * j) % 150 + 9 for j in range(12)]
Q2 = [(11 * j) % 170 + 3 for j in range(12)]


def test_the_same_image_and_question_reuse_the_image_rows(served):
    cold, report, tokens, prompt = served("x", Q1)
    warm, again, tokens_again, _ = served("x", Q1)
    assert report.rows > 576 and again.selection == report.selection
    # every full block but the one holding the last position (its logits are needed)
    assert warm == (prompt - 1) // 16 * 16 and warm > len(TEXT) + 576
    assert tokens_again == tokens  # and the same answer


def test_another_image_shares_only_the_text_before_it(served):
    served("x", Q1)
    hit, _, _, _ = served("y", Q1)
    assert hit == len(TEXT) // 16 * 16  # 32: the text blocks; no image row of x


def test_the_same_image_with_another_selection_shares_only_the_text_before_it(served):
    _, first, _, _ = served("x", Q1)
    hit, other, _, _ = served("x", Q2)
    assert other.selection != first.selection  # the questions keep different local tokens
    assert hit == len(TEXT) // 16 * 16  # the global rows come first but carry the selection in their keys
