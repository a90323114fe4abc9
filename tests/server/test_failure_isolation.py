"""A model step that fails because of one request fails that request only: the others keep
streaming, token for token what they stream alone, in both engine modes and at every stage."""

import asyncio
import json
import time

import httpx
import pytest
from PIL import Image

from server.settings import Settings
from tests.live import LiveServer, data_url, image_message
from tests.server.faults import POISON

MODEL = "tiny"
HEALTHY = [
    {"messages": [{"role": "user", "content": "Tell me a long story."}], "temperature": 0},
    {"messages": [{"role": "user", "content": "Another one, please."}], "temperature": 0.8, "seed": 7},
    {"messages": [{"role": "user", "content": "Penalised"}], "temperature": 0.9, "seed": 11,
     "frequency_penalty": 0.5},
]
TOKENS = 480  # long enough to outlast the failing request on a loaded 2-core machine (160 did not, in CI)


@pytest.fixture(scope="module", params=[False, True], ids=["in-process", "engine-process"])
def faulty(request, tiny_dir):
    with LiveServer(Settings(model=str(tiny_dir), device="cpu", max_batch_size=8, engine_process=request.param,
                             fault_hook="tests.server.faults:poison")) as s:
        yield s


def _errors(server) -> float:
    try:
        return server.metric("slime_errors_total", 'status="500"')
    except KeyError:
        return 0.0


async def _stream(c: httpx.AsyncClient, url: str, body: dict, started: asyncio.Event | None = None):
    """-> (tokens' logprobs, finish_reason or the error, time the stream ended)."""
    body = {"model": MODEL, "stream": True, "logprobs": True, "max_tokens": TOKENS, "ignore_eos": True, **body}
    lps, finish = [], None
    async with c.stream("POST", url + "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                finish = chunk["error"]
                continue
            for choice in chunk["choices"]:
                for lp in (choice.get("logprobs") or {}).get("content") or []:
                    lps.append((lp["token"], lp["logprob"]))
                    if started is not None and len(lps) == 2:
                        started.set()
                finish = choice.get("finish_reason") or finish
    return lps, finish, time.monotonic()


@pytest.mark.parametrize("stage", ["vision", "prefill", "decode", "sample"])
def test_a_failing_request_fails_alone_while_others_stream(faulty, stage):
    image = data_url(Image.new("RGB", (96, 64), (200, 30, 30)))
    poison = {"messages": [image_message("What is this?", image)], "temperature": 0.5, "seed": POISON[stage]}
    errors_before = _errors(faulty)

    async def main():
        async with httpx.AsyncClient(timeout=120) as c:
            solo = [await _stream(c, faulty.url, body) for body in HEALTHY]
            started = [asyncio.Event() for _ in HEALTHY]
            running = [asyncio.create_task(_stream(c, faulty.url, body, ev)) for body, ev in zip(HEALTHY, started)]
            for ev in started:
                await ev.wait()
            bad = await _stream(c, faulty.url, poison)
            together = await asyncio.gather(*running)
            after = await _stream(c, faulty.url, HEALTHY[1])  # the engine still serves
            return solo, together, bad, after

    solo, together, bad, after = asyncio.run(main())
    assert isinstance(bad[1], dict) and bad[1]["type"] == "server_error" and "model error" in bad[1]["message"], bad
    for alone, beside in zip(solo, together):
        assert beside[1] == "length" and len(beside[0]) == TOKENS
        assert beside[0] == alone[0]  # same tokens, bit-equal logprobs: nothing of the failure leaked
        assert beside[2] > bad[2]  # still streaming when the failing request ended
    assert after[0] == solo[1][0]
    # the error happened mid-stream (after the 200): it is counted all the same
    deadline = time.time() + 5
    while time.time() < deadline and _errors(faulty) < errors_before + 1:
        time.sleep(0.05)
    assert _errors(faulty) == errors_before + 1
    assert httpx.get(faulty.url + "/ready").status_code == 200
