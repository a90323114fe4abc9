"""The paged KV cache, end to end on the tiny checkpoint: concurrency at a fixed memory budget,
prompt sharing for n>1, preemption under memory pressure, prefix reuse, and outputs that do not
change with any of it.

8 MiB of KV on the tiny checkpoint (512 bytes a position) is 16,384 positions: a design with one
`--max-model-len 4096` slot per sequence would run 4 sequences in it."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from model.sampling_params import SamplingParams
from server.engine.client import Engine
from server.engine.runner import ModelRunner
from server.engine.types import EngineRequest
from server.settings import Settings
from tests.live import LiveServer, data_url, image_message, photo

def _photo_urls() -> list[str]:
    from model.images import load_image

    return [data_url(load_image(photo(n))) for n in ("extreme_ironing.jpg", "waterview.jpg")]


@pytest.fixture(scope="module")
def paged(tiny_dir):
    with LiveServer(Settings(model=str(tiny_dir), device="cpu", kv_cache_mb=8, max_model_len=4096, max_batch_size=32,
                             max_waiting_requests=64)) as s:
        yield s


def _client(server):
    import openai

    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


class _Peak:
    """Polls a gauge of the server while a load runs; `.value` is the highest reading."""

    def __init__(self, server, name: str):
        self.server, self.name, self.value = server, name, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self):
        while not self._stop.is_set():
            self.value = max(self.value, self.server.metric(self.name))
            time.sleep(0.01)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def test_24_image_requests_in_8_mib_all_succeed_with_at_least_10_running_at_once(paged):
    urls = _photo_urls()
    client = _client(paged)

    async def one(i):
        r = await client.chat.completions.create(
            model="tiny", max_tokens=48, temperature=0, extra_body={"ignore_eos": True},
            messages=[image_message(f"Question {i}: what is happening in this picture?", urls[i % 2])])
        return r

    async def main():
        return await asyncio.gather(*(one(i) for i in range(24)))

    with _Peak(paged, "slime_num_requests_running") as peak:
        results = asyncio.run(main())
    assert all(r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 48 for r in results)
    # image rows: ~870 and ~1,360 positions (the two photos), 1,160 a request on average with the output
    assert min(r.usage.prompt_tokens for r in results) > 800
    assert peak.value >= 10, peak.value


def _engine_run(lm, requests: list[EngineRequest], kv_bytes: int) -> tuple[list[list], int]:
    """Run requests on an in-process engine; returns each one's (token, logprob) list and the most
    KV blocks in use at the end of any step."""
    runner = ModelRunner(lm, max_batch_size=8, max_model_len=4096, kv_cache_bytes=kv_bytes)
    peak = [0]

    def on_stats(stats):
        peak[0] = max(peak[0], round(stats.kv_usage * (runner.num_blocks - 1)))

    engine = Engine(runner, on_stats=on_stats, vision_thread=False)
    with engine:
        async def collect(req):
            out = []
            async for ev in engine.submit(req):
                assert ev.error is None, ev.error
                out += [(t, lp.logprob) for t, lp in zip(ev.token_ids, ev.logprobs)]
            return out

        async def main():
            return await asyncio.gather(*(collect(r) for r in requests))

        return asyncio.run(main()), peak[0]


def test_the_choices_of_an_n4_image_request_share_the_prompt_and_decode_as_it_would_alone(tiny_lm, ironing):
    from model.processor import prepare_image

    image = prepare_image(ironing, tiny_lm.cfg, "ironing-n4", norm=tiny_lm.image_norm)
    tok = tiny_lm.tokenizer
    ids = [1] + tok.encode("USER:", add_special_tokens=False) + [-200] + tok.encode(
        "What is in the image? ASSISTANT:", add_special_tokens=False)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=True)

    def req(i, group=None):
        return EngineRequest(f"c{i}", ids, [image], params, 3000, group=group)

    (alone,), solo_blocks = _engine_run(tiny_lm, [req(0)], 8 << 20)
    choices, n4_blocks = _engine_run(tiny_lm, [req(i, "chat-1") for i in range(4)], 8 << 20)
    assert all(c == alone for c in choices)  # the same tokens and bit-equal logprobs as a solo run
    assert solo_blocks >= 50  # 800+ image-row positions
    assert n4_blocks < 0.35 * 4 * solo_blocks, (n4_blocks, solo_blocks)  # well under half of four copies


def test_the_cpu_default_pool_holds_at_least_one_sequence():
    import torch

    from server.engine.runner import kv_cache_blocks

    mib = 1 << 20
    # a 13B in float32: 1.56 MiB a position; 4 GiB would hold 2,621 positions, fewer than 4,096
    blocks = kv_cache_blocks(None, block_size=16, bytes_per_token=1600 * mib // 1024, max_model_len=4096,
                             device=torch.device("cpu"))
    assert (blocks - 1) * 16 >= 4096
    tiny = kv_cache_blocks(None, block_size=16, bytes_per_token=512, max_model_len=4096, device=torch.device("cpu"))
    assert tiny - 1 == 16 * 256  # 16 sequences where they fit under the cap


def _text_requests(n: int, prefix: str) -> list[list[dict]]:
    return [[{"role": "system", "content": prefix}, {"role": "user", "content": f"Tell me about number {i}."}]
            for i in range(n)]


def test_requests_that_cannot_fit_at_once_all_complete_and_answer_as_they_do_alone(tiny_dir):
    # 1 MiB: 2,048 positions. 24 requests of ~60 + 160 positions need 24 x 14 blocks of 16: more
    # than three times the pool, so sequences are preempted and computed again while others run.
    with LiveServer(Settings(model=str(tiny_dir), device="cpu", kv_cache_mb=1, max_model_len=1024,
                             max_batch_size=32, max_waiting_requests=64)) as server:
        long_system = " ".join(f"rule {k} says nothing" for k in range(60))  # ~700: > one prefill chunk: hits
        convs = _text_requests(16, "Be brief.") + _text_requests(8, long_system)[:8]
        max_tokens = [160] * 16 + [40] * 8

        async def one(client, messages, n):
            r = await client.chat.completions.create(model="tiny", messages=messages, max_tokens=n, temperature=0,
                                                     logprobs=True, extra_body={"ignore_eos": True})
            c = r.choices[0]
            return c.finish_reason, [(t.token, t.logprob) for t in c.logprobs.content]

        async def alone():  # a client per event loop
            client = _client(server)
            return [await one(client, m, n) for m, n in zip(convs, max_tokens)]

        async def together():
            client = _client(server)
            return await asyncio.gather(*(one(client, m, n) for m, n in zip(convs, max_tokens)))

        solo = asyncio.run(alone())
        assert server.metric("slime_num_preemptions_total") == 0
        loaded = asyncio.run(together())
        assert server.metric("slime_num_preemptions_total") > 0
        assert server.metric("slime_prefix_cache_hit_tokens_total") >= 8 * 512
        assert [f for f, _ in loaded] == ["length"] * 24
        assert loaded == solo  # tokens and logprobs, bit for bit


def test_a_repeated_long_system_prompt_is_not_computed_again(paged):
    import httpx

    def ttft(system: str, question: str) -> float:
        """Seconds to the first (and only) token."""
        body = {"model": "tiny", "max_tokens": 1,
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}]}
        t0 = time.perf_counter()
        assert httpx.post(paged.url + "/v1/chat/completions", json=body, timeout=120).status_code == 200
        return time.perf_counter() - t0

    ratios = []
    for k in range(3):
        system = " ".join(f"policy {k}.{j} applies to every answer" for j in range(160))  # ~2,900 positions
        hits = paged.metric("slime_prefix_cache_hit_tokens_total")
        cold = ttft(system, "First question?")
        assert paged.metric("slime_prefix_cache_hit_tokens_total") == hits
        warm = ttft(system, "A different question?")
        assert paged.metric("slime_prefix_cache_hit_tokens_total") - hits >= 2560  # 5 chunks of 512 reused
        ratios.append(warm / cold)
    # the benchmark (bench/paged_kv.py) measures this precisely; here only that it is clearly faster
    assert sorted(ratios)[1] < 0.6, ratios
