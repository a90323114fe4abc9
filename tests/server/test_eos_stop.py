"""A request that ends because the model emitted its EOS token: finish_reason "stop" right at that
token, through the engine and through the HTTP server (no stop string, not max_tokens).

The tiny checkpoint's random weights never pick EOS, so a freshly loaded copy is changed to pick
it where it would have picked the fourth token of a known greedy answer (see tests/forced_eos.py).
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from model.generation import generate
from model.loading import LoadOptions, load_model
from model.sampling import SamplingParams
from model.templates import Message
from server.engine.client import Engine
from server.engine.runner import ModelRunner
from server.engine.types import EngineRequest
from server.settings import Settings
from tests.forced_eos import expected_stop, force_eos

from tests.live import LiveServer

PROMPT = [1] + [(7 * j) % 180 + 5 for j in range(20)]
OTHER = [1] + [(11 * j) % 170 + 9 for j in range(15)]
QUESTION = "Tell me a story about a red car."
MAX_TOKENS = 10


def _collect(engine: Engine, requests: list[tuple[list[int], SamplingParams]]) -> list[tuple[list[int], list, str]]:
    """Each request's (token ids, events, text)."""
    async def one(i, ids, params):
        events = [ev async for ev in engine.submit(EngineRequest(f"r{i}", ids, [], params, len(ids)))]
        return [t for ev in events for t in ev.token_ids], events, "".join(ev.text for ev in events)

    async def main():
        return await asyncio.gather(*(one(i, ids, p) for i, (ids, p) in enumerate(requests)))

    return asyncio.run(main())


def _engine(lm) -> Engine:
    engine = Engine(ModelRunner(lm, max_batch_size=4, max_model_len=256), max_batch_size=4)
    engine.start()
    return engine


def _greedy(ignore_eos: bool, n: int = MAX_TOKENS) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=ignore_eos)


@pytest.fixture(scope="module")
def eos_model(tiny_dir, tiny_lm):
    """(a copy of the tiny model that emits EOS in place of the 4th token of PROMPT's greedy answer,
    the unmodified answer, the EOS id)."""
    engine = _engine(tiny_lm)
    try:
        free = _collect(engine, [(PROMPT, _greedy(True))])[0][0]
    finally:
        engine.stop()
    lm = load_model(tiny_dir, LoadOptions(device="cpu"))
    eos = lm.tokenizer.eos_token_id
    assert eos in lm.eos_token_ids and len(free) == MAX_TOKENS
    force_eos(lm, eos, free[3])
    return lm, free, eos


def test_the_engine_stops_at_the_eos_token(eos_model):
    lm, free, eos = eos_model
    want = expected_stop(free, free[3], eos)
    engine = _engine(lm)
    try:
        # beside a request that ignores EOS and runs on (same batch, another prompt)
        (tokens, events, text), (other, other_events, _) = _collect(engine, [(PROMPT, _greedy(False)),
                                                                           (OTHER, _greedy(True, 14))])
        ignoring = _collect(engine, [(PROMPT, _greedy(True))])[0]
        other_alone = _collect(engine, [(OTHER, _greedy(True, 14))])[0][0]
    finally:
        engine.stop()
    assert tokens == want and len(want) < MAX_TOKENS
    last = events[-1]
    assert last.finish_reason == "stop" and last.token_ids == [eos] and last.text == ""
    assert all(ev.finish_reason is None for ev in events[:-1])
    assert last.completion_tokens == len(want)
    assert text == lm.tokenizer.decode(want[:-1], skip_special_tokens=True).lstrip()
    # with ignore_eos the same model emits EOS at the same place and goes on to max_tokens
    assert ignoring[0][:len(want)] == want and len(ignoring[0]) == MAX_TOKENS
    assert ignoring[1][-1].finish_reason == "length"
    # the sequence that stopped freed its slot without disturbing the one beside it
    assert other == other_alone and other_events[-1].finish_reason == "length" and len(other) == 14


@pytest.fixture(scope="module")
def eos_server(tiny_dir, tiny_lm):
    """A server whose model emits EOS in place of the 4th token of QUESTION's greedy answer."""
    import model.loading

    free = generate(tiny_lm, [Message("user", QUESTION)], [], _greedy(True)).token_ids
    eos = tiny_lm.tokenizer.eos_token_id
    real_load = model.loading.load_model

    def load_and_force(*args, **kwargs):
        lm = real_load(*args, **kwargs)
        force_eos(lm, eos, free[3])
        return lm

    mp = pytest.MonkeyPatch()
    mp.setattr(model.loading, "load_model", load_and_force)  # what the server's engine factory calls
    try:
        s = LiveServer(Settings(model=str(tiny_dir), device="cpu", max_batch_size=4)).start()
    finally:
        mp.undo()
    yield s, expected_stop(free, free[3], eos)
    s.stop()


def _body(srv, **extra) -> dict:
    return {"model": srv.state.settings.model_id, "messages": [{"role": "user", "content": QUESTION}],
            "max_tokens": MAX_TOKENS, "temperature": 0, **extra}


def test_the_server_answers_finish_reason_stop_at_the_eos_token(eos_server, tiny_lm):
    srv, want = eos_server
    text = tiny_lm.tokenizer.decode(want[:-1], skip_special_tokens=True).lstrip()
    stops_before = _stops(srv)
    r = httpx.post(srv.url + "/v1/chat/completions", json=_body(srv, logprobs=True), timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["content"] == text and "</s>" not in choice["message"]["content"]
    assert body["usage"]["completion_tokens"] == len(want) < MAX_TOKENS
    tokens = [t["token"] for t in choice["logprobs"]["content"]]
    assert tokens == tiny_lm.tokenizer.convert_ids_to_tokens(want) and tokens[-1] == "</s>"
    assert _stops(srv) == stops_before + 1
    # streamed: the same text, and the last choice chunk says "stop"
    with httpx.stream("POST", srv.url + "/v1/chat/completions", json=_body(srv, stream=True), timeout=60) as s:
        chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == text
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "stop"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    # ignore_eos: the EOS token is generated and passed over, up to max_tokens
    r = httpx.post(srv.url + "/v1/chat/completions", json=_body(srv, ignore_eos=True), timeout=60)
    assert r.json()["choices"][0]["finish_reason"] == "length"
    assert r.json()["usage"]["completion_tokens"] == MAX_TOKENS


def _stops(srv) -> float:
    try:
        return srv.metric("slime_requests_total", 'finish_reason="stop"')
    except KeyError:
        return 0.0
