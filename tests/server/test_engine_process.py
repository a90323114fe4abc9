"""`--engine-process`: the engine in its own process, driven through the real server and client."""

import asyncio
import json
import os
import time

import httpx
import pytest

from model.generation import generate
from model.sampling import SamplingParams
from model.templates import Message
from server.settings import Settings
from tests.live import LiveServer, data_url, image_message, stream_lines

MODEL = "tiny"
QUESTION = "What is unusual about this image?"


def _metric_or_zero(server, name, labels=""):
    try:
        return server.metric(name, labels)
    except KeyError:  # a labelled counter appears with its first increment
        return 0.0


@pytest.fixture(scope="module")
def ep(tiny_dir):
    with LiveServer(Settings(model=str(tiny_dir), device="cpu", max_batch_size=16, engine_process=True)) as s:
        yield s
    assert not s.state.engine.process.is_alive()  # stopping the server ends the engine process


@pytest.fixture(scope="module")
def ep_client(ep):
    import openai

    return openai.OpenAI(base_url=ep.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_streams_what_the_model_generates_and_reports_its_metrics(ep, ep_client, tiny_lm, ironing):
    image = ironing.resize((500, 375))
    ref = generate(tiny_lm, [Message("user", QUESTION, num_images=1)], [image],
                   SamplingParams(max_tokens=12, temperature=0))
    tokens_before = ep.metric("slime_generation_tokens_total")
    stream = ep_client.chat.completions.create(model=MODEL, messages=[image_message(QUESTION, data_url(image))],
                                               max_tokens=12, temperature=0, stream=True,
                                               stream_options={"include_usage": True})
    text, usage = "", None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        usage = chunk.usage or usage
    assert text == ref.text and usage.completion_tokens == 12 and usage.prompt_tokens == ref.prompt_tokens
    # metric updates made in the engine process are replayed in the API process's registry
    deadline = time.time() + 5
    while time.time() < deadline and ep.metric("slime_generation_tokens_total") < tokens_before + 12:
        time.sleep(0.05)
    assert ep.metric("slime_generation_tokens_total") == tokens_before + 12
    assert ep.metric("slime_image_tokens_total", 'kind="global"') > 0


def test_a_repeated_image_hits_the_engine_process_vision_cache(ep, ep_client, waterview):
    url = data_url(waterview.resize((640, 420)), "JPEG")
    hits = _metric_or_zero(ep, "slime_vision_cache_total", 'result="hit"')
    answers = [ep_client.chat.completions.create(model=MODEL, messages=[image_message("Where?", url)], max_tokens=6,
                                                 temperature=0).choices[0].message.content for _ in range(2)]
    assert answers[0] == answers[1]
    assert ep.metric("slime_vision_cache_total", 'result="hit"') == hits + 1


def test_abandoned_streams_free_their_slots(ep):
    async def main():
        async with httpx.AsyncClient(timeout=30) as c:
            body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 500,
                    "ignore_eos": True, "stream": True}

            async def abandon():
                async with c.stream("POST", ep.url + "/v1/chat/completions", json=body) as r:
                    async for line in r.aiter_lines():
                        if '"content"' in line:
                            break

            await asyncio.gather(*(abandon() for _ in range(24)))

    asyncio.run(main())
    deadline = time.time() + 15
    while time.time() < deadline and (ep.metric("slime_num_requests_running") or ep.state.engine.num_requests):
        time.sleep(0.05)
    assert ep.metric("slime_num_requests_running") == 0 and ep.metric("slime_num_requests_waiting") == 0
    assert ep.state.engine.num_requests == 0


def test_a_dead_engine_process_ends_streams_and_fails_health(tiny_dir):
    with LiveServer(Settings(model=str(tiny_dir), device="cpu", engine_process=True)) as s:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3000,
                "ignore_eos": True, "stream": True}
        # a crash (OOM killer, segfault) of the engine process in the middle of a stream
        lines = stream_lines(s.url, body, after=3, then=s.state.engine.process.kill)
        assert any('"error"' in x for x in lines) and lines[-1] == "data: [DONE]"
        assert httpx.get(s.url + "/health").status_code == 503  # liveness fails: restart me
        assert httpx.get(s.url + "/ready").status_code == 503
        r = httpx.post(s.url + "/v1/chat/completions", json={**body, "stream": False, "max_tokens": 2}, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["type"]


def test_an_engine_process_that_fails_to_load_fails_health(tmp_path):
    (tmp_path / "config.json").write_text("{}")  # a checkpoint directory without weights
    s = LiveServer(Settings(model=str(tmp_path), device="cpu", engine_process=True)).start(wait_ready=False)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and httpx.get(s.url + "/health").status_code == 200:
            time.sleep(0.1)
        r = httpx.get(s.url + "/health")
        assert r.status_code == 503 and "engine process failed to start" in r.json()["detail"]
        assert httpx.get(s.url + "/ready").status_code == 503
    finally:
        s.stop()


def test_pixels_cross_a_pipe_bit_for_bit():
    import os
    import threading

    import numpy as np

    from model.processor import PreparedImage
    from model.sampling import SamplingParams as Params
    from server.engine.process import _read_array, _split_pixels, _write_array
    from server.engine.types import EngineRequest

    pixels = np.random.default_rng(0).standard_normal((3, 3, 336, 336), dtype=np.float32)  # > a pipe's buffer
    req = EngineRequest("r", [1, -200, -200], [PreparedImage(None, (1, 1), "cached"), PreparedImage(pixels, (2, 1))],
                        Params(), 10)
    bare, arrays = _split_pixels(req)
    assert [i for i, _ in arrays] == [1] and all(img.pixels is None for img in bare.images)
    assert req.images[1].pixels is pixels  # the caller's request is left as it was
    r, w = os.pipe()
    try:
        writer = threading.Thread(target=_write_array, args=(w, pixels))
        writer.start()
        back = _read_array(r, pixels.shape, pixels.dtype.str)
        writer.join()
    finally:
        os.close(r)
        os.close(w)
    assert back.dtype == np.float32 and np.array_equal(back, pixels)


def test_engine_stats_cross_the_pipe_and_feed_the_registry():
    import pickle

    from server.engine.types import EngineStats, FinishedRequest
    from server.metrics import Metrics

    stats = EngineStats(running=2, waiting=1, kv_usage=0.25, batch_sizes=[3], ttft=[0.1], itl=[0.01, 0.02],
                        image_tokens={"global": 576, "local_kept": 100},
                        finished=[FinishedRequest("ok", "length", 700, 12, 1.5),
                                  FinishedRequest("error", "error", 0, 0, None)])
    real = Metrics()
    real.observe_engine(pickle.loads(pickle.dumps(stats)))  # as the engine process sends it
    assert real.running._value.get() == 2 and real.waiting._value.get() == 1
    assert real.kv_usage._value.get() == 0.25
    assert real.image_tokens.labels("global")._value.get() == 576
    assert real.batch_size._sum.get() == 3 and real.itl._sum.get() == 0.03
    assert real.requests.labels("ok", "length")._value.get() == 1
    assert real.requests.labels("error", "error")._value.get() == 1
    assert real.prompt_tokens._value.get() == 700 and real.generation_tokens._value.get() == 12
    assert real.e2e._sum.get() == 1.5


def test_the_attention_backend_info_follows_a_fallback():
    """One series at a time: a report naming another backend moves the 1 to it; a report without
    one (a bare report) changes nothing."""
    from server.engine.types import EngineStats
    from server.metrics import Metrics

    real = Metrics()

    def series():
        return {s.labels["backend"]: s.value for m in real.registry.collect() if m.name == "slime_attention_backend_info"
                for s in m.samples}

    assert series() == {}
    real.observe_engine(EngineStats(attention_backend="flash"))
    assert series() == {"flash": 1}
    real.observe_engine(EngineStats(attention_backend="triton"))
    real.observe_engine(EngineStats())
    assert series() == {"triton": 1}


def _answer(url: str, body: dict) -> tuple[int, dict]:
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
    data = r.json()
    if r.status_code != 200:
        return r.status_code, {"type": data["error"]["type"], "param": data["error"].get("param")}
    return 200, {"choices": data["choices"], "usage": data["usage"]}


def test_answers_match_the_in_process_engine_feature_by_feature(ep, server):
    """Stop strings, n with seeds, logprobs, streaming and errors: the same answers either way."""
    base = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a story about a cat."}]}
    _, greedy = _answer(server.url, {**base, "max_tokens": 24, "temperature": 0})
    text = greedy["choices"][0]["message"]["content"]
    words = text.split()
    assert len(words) >= 4
    stop = words[len(words) // 2]  # a stop string that occurs mid-answer
    bodies = [
        {**base, "max_tokens": 24, "temperature": 0, "stop": [stop]},
        {**base, "max_tokens": 8, "temperature": 0.9, "seed": 7, "n": 2, "logprobs": True, "top_logprobs": 2},
        {**base, "max_tokens": 6, "temperature": 0, "frequency_penalty": 1.5},
        {**base, "max_tokens": 4096, "temperature": 0},  # prompt plus max_tokens exceed the context
        {**base, "max_tokens": 5, "n": 99},  # beyond --max-n
    ]
    for body in bodies:
        assert _answer(ep.url, body) == _answer(server.url, body), body
    stopped = _answer(ep.url, bodies[0])[1]["choices"][0]
    assert stopped["finish_reason"] == "stop" and stop not in stopped["message"]["content"]

    def streamed(url):
        body = {**bodies[0], "stream": True}
        lines = stream_lines(url, body, after=-1, then=lambda: None)
        chunks = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]), \
            [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1]

    assert streamed(ep.url) == streamed(server.url) == (stopped["message"]["content"], "stop")


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads thread priorities from Linux /proc")
def test_the_engine_process_vision_thread_runs_at_the_configured_niceness(ep, ep_client):
    # --vision-nice crosses into the engine process: its vision thread (and the OpenMP workers it
    # starts, which inherit its name and niceness) runs at +10; every other thread, the engine
    # thread's decode steps first, at the process's own.
    ep_client.chat.completions.create(model=MODEL, messages=[image_message("x", data_url(_small_image()))],
                                      max_tokens=2)  # the vision thread has worked (started its workers)
    pid = ep.state.engine.process.pid
    base = _stat_nice(f"/proc/{pid}")
    threads = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            comm = open(f"/proc/{pid}/task/{tid}/comm").read().strip()
            threads[tid] = (comm, _stat_nice(f"/proc/{pid}/task/{tid}"))
        except FileNotFoundError:  # a thread that just ended
            pass
    assert Settings().vision_nice == 10
    vision = [n for comm, n in threads.values() if comm == "slime-vision"]
    others = [n for comm, n in threads.values() if comm != "slime-vision"]
    assert vision and set(vision) == {min(19, base + 10)}, threads
    assert "slime-engine" in {comm for comm, _ in threads.values()} and set(others) == {base}, threads


def _stat_nice(proc_dir: str) -> int:
    return int(open(proc_dir + "/stat").read().rsplit(")", 1)[1].split()[16])


def _small_image():
    from PIL import Image

    return Image.new("RGB", (80, 60), (10, 120, 200))
