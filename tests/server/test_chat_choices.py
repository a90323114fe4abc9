"""The choices of an n>1 request served through `ChatService` on a real engine: one failing choice
fails the request, and its siblings stop with it (none is left waiting on a stream forever)."""

from __future__ import annotations

import asyncio

import pytest

from server.chat import ChatService
from server.engine.client import Engine
from server.engine.runner import ModelRunner
from server.engine.streams import StreamRegistry
from server.errors import APIError
from server.protocol import ChatCompletionRequest
from server.settings import Settings
from tests.server.faults import POISON, poison


def test_closing_a_stream_wakes_a_reader_waiting_on_it():
    async def main():
        stream = StreamRegistry(lambda rid: None).open("r")
        reader = asyncio.create_task(anext(stream, "ended"))
        await asyncio.sleep(0.05)
        assert not reader.done()  # no event yet: waiting
        await stream.aclose()
        return await asyncio.wait_for(reader, 1)

    assert asyncio.run(main()) == "ended"


def test_a_failing_choice_fails_the_request_and_its_siblings_stop(tiny_dir, tiny_lm):
    engine = Engine(ModelRunner(tiny_lm, max_batch_size=4, max_model_len=512), fault_hook=poison)
    with engine:
        chat = ChatService(Settings(model=str(tiny_dir), device="cpu"), engine)
    # choice i draws with seed + i: choice 1 carries the prefill poison, so forking it fails, while
    # choice 0 would go on for 300 tokens
        req = ChatCompletionRequest.model_validate({
            "model": "tiny", "n": 2, "seed": POISON["prefill"] - 1, "max_tokens": 300, "ignore_eos": True,
            "messages": [{"role": "user", "content": "hello there"}]})

        async def main():
            with pytest.raises(APIError) as info:
                await asyncio.wait_for(chat.complete(req), 30)
            await asyncio.sleep(0.2)
            left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            return info.value, left

        err, left = asyncio.run(main())
        assert err.status == 500
        assert left == []  # before: choice 0's collector hung in its aborted stream's queue
        for _ in range(100):  # the aborted choice leaves the engine too
            if engine.num_requests == 0 and not engine.scheduler.has_work:
                break
            asyncio.run(asyncio.sleep(0.05))
        assert engine.num_requests == 0 and not engine.scheduler.has_work
