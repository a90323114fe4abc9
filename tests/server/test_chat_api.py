"""The OpenAI API over real HTTP, with the official `openai` client."""

import asyncio

import httpx
import pytest
from PIL import Image

from model.generation import generate
from model.sampling import SamplingParams
from model.templates import Message
from tests.live import data_url, image_message

MODEL = "tiny"
QUESTION = "What is unusual about this image?"


def solo(tiny_lm, images, text=QUESTION, n=12, messages=None):
    msgs = messages or [Message("user", text, num_images=len(images))]
    return generate(tiny_lm, msgs, images, SamplingParams(max_tokens=n, temperature=0))


@pytest.fixture(scope="module")
def small_ironing(ironing):
    return ironing.resize((500, 375))


def test_unstreamed_greedy_equals_one_shot(client, tiny_lm, small_ironing):
    ref = solo(tiny_lm, [small_ironing])
    r = client.chat.completions.create(model=MODEL, messages=[image_message(QUESTION, data_url(small_ironing))],
                                       max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content.rstrip() == ref.text
    assert r.choices[0].finish_reason == ref.finish_reason == "length"
    assert r.usage.prompt_tokens == ref.prompt_tokens
    assert r.usage.completion_tokens == 12 and r.usage.total_tokens == ref.prompt_tokens + 12


def test_streamed_chunks_in_openai_order(client, tiny_lm, small_ironing):
    ref = solo(tiny_lm, [small_ironing])
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[image_message(QUESTION, data_url(small_ironing))], max_tokens=12, temperature=0,
        stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content  # with its token
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(content).rstrip() == ref.text
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == ref.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_ends_with_done(server, small_ironing):
    body = {"model": MODEL, "messages": [image_message("hi", data_url(small_ironing))], "max_tokens": 3,
            "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
def test_image_formats(client, fmt):
    img = Image.new("RGB", (300, 200), (30, 120, 200))
    r = client.chat.completions.create(model=MODEL, messages=[image_message("Color?", data_url(img, fmt))],
                                       max_tokens=2, temperature=0)
    assert r.usage.prompt_tokens > 576


def test_two_images_in_one_message(client, tiny_lm, small_ironing, waterview):
    water = waterview.resize((400, 300))
    ref = solo(tiny_lm, [small_ironing, water], text="Compare them.")
    r = client.chat.completions.create(
        model=MODEL, messages=[image_message("Compare them.", data_url(small_ironing), data_url(water))],
        max_tokens=12, temperature=0)
    assert r.usage.prompt_tokens == ref.prompt_tokens > 2 * 577
    assert r.choices[0].message.content.rstrip() == ref.text


def test_multi_turn_with_image_in_earlier_turn(client, tiny_lm, small_ironing):
    msgs = [Message("user", QUESTION, 1), Message("assistant", "A man irons."), Message("user", "Why?")]
    ref = solo(tiny_lm, [small_ironing], messages=msgs)
    r = client.chat.completions.create(model=MODEL, messages=[
        image_message(QUESTION, data_url(small_ironing)), {"role": "assistant", "content": "A man irons."},
        {"role": "user", "content": "Why?"}], max_tokens=12, temperature=0)
    assert r.usage.prompt_tokens == ref.prompt_tokens
    assert r.choices[0].message.content.rstrip() == ref.text


def test_stop_string_across_token_boundary_never_leaks(client, tiny_lm, small_ironing):
    ref = solo(tiny_lm, [small_ironing], n=12)
    tok = tiny_lm.tokenizer
    # a stop string made of the end of one token's text and the start of the next one's
    pieces = [tok.decode(ref.token_ids[:i], skip_special_tokens=True) for i in range(1, len(ref.token_ids) + 1)]
    k = next(i for i in range(2, len(pieces)) if len(pieces[i - 1]) - len(pieces[i - 2]) >= 2
             and len(pieces[i]) - len(pieces[i - 1]) >= 2)
    boundary = len(pieces[k - 1])
    stop = pieces[k][boundary - 2:boundary + 2]
    expect = ref.text[:ref.text.find(stop)]
    for stream in (False, True):
        kwargs = dict(model=MODEL, messages=[image_message(QUESTION, data_url(small_ironing))], max_tokens=12,
                      temperature=0, stop=[stop])
        if stream:
            chunks = list(client.chat.completions.create(stream=True, **kwargs))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        else:
            r = client.chat.completions.create(**kwargs)
            text, finish = r.choices[0].message.content, [r.choices[0].finish_reason]
        assert text == expect and stop not in text
        assert finish == ["stop"]


def test_seed_reproducibility(client):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=16,
                  temperature=1.0, top_p=0.9, seed=1234)
    a = client.chat.completions.create(**kwargs).choices[0].message.content
    b = client.chat.completions.create(**kwargs).choices[0].message.content
    c = client.chat.completions.create(**{**kwargs, "seed": 99}).choices[0].message.content
    assert a == b and a != c


def test_n_choices_and_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       temperature=0.8, n=3, seed=5, logprobs=True, top_logprobs=2)
    assert [c.index for c in r.choices] == [0, 1, 2]
    lp = r.choices[0].logprobs.content
    assert len(lp) == 4 and all(len(x.top_logprobs) == 2 and x.logprob <= 0 for x in lp)
    assert r.usage.completion_tokens == 12


def test_streamed_n_choices_each_complete(client):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=6, temperature=0)
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    texts, finishes = {0: "", 1: ""}, {}
    for chunk in client.chat.completions.create(**kwargs, n=2, stream=True):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert texts == {0: whole, 1: whole}
    assert set(finishes) == {0, 1}


def test_sixteen_concurrent_streams_equal_their_solo_runs(aclient, tiny_lm, ironing, waterview):
    images = [(ironing if i % 2 else waterview).resize((300 + 37 * i, 200 + 23 * i)) for i in range(16)]
    # Different lengths: streams finish at different steps, and the batch's slots move under the rest.
    lengths = [4 + (5 * i) % 13 for i in range(16)]
    refs = [solo(tiny_lm, [img], n=n) for img, n in zip(images, lengths)]

    async def one(img, n):
        stream = await aclient.chat.completions.create(
            model=MODEL, messages=[image_message(QUESTION, data_url(img))], max_tokens=n, temperature=0,
            logprobs=True, stream=True, stream_options={"include_usage": True})
        text, logprobs, usage = [], [], None
        async for c in stream:
            if c.choices:
                text.append(c.choices[0].delta.content or "")
                logprobs += [t.logprob for t in (c.choices[0].logprobs.content if c.choices[0].logprobs else [])]
            if c.usage:
                usage = c.usage
        return "".join(text), logprobs, usage

    async def main():
        alone = [await one(img, n) for img, n in zip(images, lengths)]
        return alone, await asyncio.gather(*(one(img, n) for img, n in zip(images, lengths)))

    alone, results = asyncio.run(main())
    for (text, logprobs, usage), (_, solo_logprobs, _), ref, n in zip(results, alone, refs, lengths):
        assert text.rstrip() == ref.text
        assert usage.prompt_tokens == ref.prompt_tokens and usage.completion_tokens == n
        assert logprobs == solo_logprobs  # bit for bit: CPU decoding is batch-invariant


def test_models_health_ready_metrics(server, client, small_ironing):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert httpx.get(server.url + "/ready").status_code == 200
    client.chat.completions.create(model=MODEL, messages=[image_message("hi", data_url(small_ironing))],
                                   max_tokens=2, temperature=0)
    text = httpx.get(server.url + "/metrics").text
    for name in ("slime_requests_total", "slime_time_to_first_token_seconds_bucket",
                 "slime_inter_token_latency_seconds_bucket", "slime_e2e_request_latency_seconds_bucket",
                 "slime_queue_time_seconds_bucket", "slime_prompt_tokens_total", "slime_generation_tokens_total",
                 "slime_num_requests_running", "slime_num_requests_waiting", "slime_kv_cache_usage_ratio",
                 "slime_batch_size_bucket", "slime_image_preprocess_seconds_bucket",
                 "slime_vision_encode_seconds_bucket", 'slime_image_tokens_total{kind="local_kept"}'):
        assert name in text, name
    assert server.metric("slime_image_tokens_total", 'kind="global"') >= 576


def test_disconnect_mid_stream_frees_the_slot(server, small_ironing):
    body = {"model": MODEL, "messages": [image_message("hi", data_url(small_ironing))], "max_tokens": 2000,
            "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        seen = 0
        for line in r.iter_lines():
            if line.startswith("data: ") and '"content"' in line:
                seen += 1
            if seen >= 3:
                break
    import time

    deadline = time.time() + 10
    while time.time() < deadline and server.metric("slime_num_requests_running") != 0:
        time.sleep(0.05)
    assert server.metric("slime_num_requests_running") == 0
    assert server.metric("slime_requests_total", 'status="aborted"') >= 1


def test_disconnect_unstreamed_aborts(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3000,
            "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json=body, timeout=0.5)
    import time

    deadline = time.time() + 10
    while time.time() < deadline and server.metric("slime_num_requests_running") != 0:
        time.sleep(0.05)
    assert server.metric("slime_num_requests_running") == 0


def test_unsupported_field_is_rejected_by_name(client):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       logit_bias={"5": 1})
    assert e.value.body["param"] == "logit_bias"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"bogus_field": 1})
    assert "bogus_field" in e.value.body["message"]


def test_unknown_model_is_404(client):
    import openai

    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "model_not_found"


def test_selection_extension(client, small_ironing, tiny_lm):
    ref = solo(tiny_lm, [small_ironing], n=2)
    r = client.chat.completions.create(model=MODEL, messages=[image_message(QUESTION, data_url(small_ironing))],
                                       max_tokens=2, temperature=0, extra_body={"slime_selection": True})
    img = r.model_extra["slime"]["images"][0]
    assert img["local_kept"] == ref.images[0].local_kept
    assert len(img["kept_mask"]) == img["local_tokens"] and img["kept_mask"].count("1") == img["local_kept"]
    plain = client.chat.completions.create(model=MODEL, messages=[image_message(QUESTION, data_url(small_ironing))],
                                           max_tokens=2, temperature=0)
    assert "slime" not in (plain.model_extra or {})


def test_repeated_image_hits_the_vision_cache_with_identical_answer(server, client, ironing):
    img = ironing.resize((700, 520))
    url = data_url(img, "JPEG")
    hits0 = server.metric("slime_vision_cache_total", 'result="hit"') if _has(server, "hit") else 0.0
    kwargs = dict(model=MODEL, max_tokens=8, temperature=0)
    first = client.chat.completions.create(messages=[image_message(QUESTION, url)], **kwargs)
    # a second turn resends the image with another question: selection reruns on cached features
    again = client.chat.completions.create(messages=[image_message(QUESTION, url)], **kwargs)
    other = client.chat.completions.create(messages=[image_message("Describe the left side.", url)], **kwargs)
    assert again.choices[0].message.content == first.choices[0].message.content
    assert again.usage.prompt_tokens == first.usage.prompt_tokens
    assert server.metric("slime_vision_cache_total", 'result="hit"') == hits0 + 2
    assert other.usage.prompt_tokens > 576


def _has(server, result):
    try:
        server.metric("slime_vision_cache_total", f'result="{result}"')
        return True
    except KeyError:
        return False
