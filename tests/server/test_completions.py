"""POST /v1/completions through the official SDK: text or token-id prompts, streamed or not, n,
logprobs in the legacy shape, usage; and its 400s."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

MODEL = "tiny"


def test_a_text_prompt_is_continued(client, server):
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.choices[0].text and r.choices[0].finish_reason == "length"
    ids = httpx.post(server.url + "/tokenize", json={"prompt": "Once upon a time"}, timeout=30).json()["tokens"]
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 6
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert by_ids.choices[0].text == r.choices[0].text  # token ids: the same prompt


def test_the_default_max_tokens_is_16_as_openai_has_it(client):
    r = client.completions.create(model=MODEL, prompt="hi", temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 16


def test_streamed_text_equals_the_whole(client):
    kw = dict(model=MODEL, prompt="The sky", max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    whole = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert texts[0] and "".join(texts) == whole  # the first chunk carries the first token
    assert chunks[-1].usage.completion_tokens == 8 and not chunks[-1].choices


def test_n_and_logprobs(client):
    r = client.completions.create(model=MODEL, prompt="x", max_tokens=4, n=2, temperature=0.9, seed=3, logprobs=2,
                                  extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1] and r.usage.completion_tokens == 8
    for c in r.choices:
        lp = c.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
        assert all(len(top) <= 2 for top in lp.top_logprobs) and lp.text_offset[0] == 0
        assert all(v <= 0 for v in lp.token_logprobs)


@pytest.mark.parametrize("body, param", [
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [10**9]}, "prompt.0"),
    ({"prompt": "x", "echo": True}, "echo"),
    ({"prompt": "x", "suffix": "y"}, "suffix"),
    ({"prompt": "x", "max_tokens": 10**7}, "max_tokens"),
    ({"prompt": "x", "logprobs": 50}, "logprobs"),
    ({"prompt": "x", "surprise": 1}, "surprise"),
])
def test_bad_requests_are_400s(server, body, param):
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, **body}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_a_prompt_longer_than_the_context(server):
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": [5] * 70000}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_another_model_is_a_404(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-3.5-turbo-instruct", prompt="x")


def test_raw_stream_shape(server):
    body = {"model": MODEL, "prompt": "a", "max_tokens": 3, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
        lines = [x for x in r.iter_lines() if x.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(x[6:]) for x in lines[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks) and chunks[-1]["choices"][0]["finish_reason"]
