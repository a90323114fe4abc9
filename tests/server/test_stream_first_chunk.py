"""A streamed answer's first data chunk carries its first token (with the role): clients time the
first token at the first chunk, so a role-only chunk sent on acceptance made their TTFT a lie."""

from __future__ import annotations

import json

import httpx
import pytest

MODEL = "tiny"


def _chunks(server, **body) -> list[dict]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "stream": True, **body}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


@pytest.mark.parametrize("extra", [{}, {"logprobs": True}], ids=["text", "logprobs"])
def test_the_first_chunk_of_each_choice_carries_its_first_token_and_role(server, extra):
    chunks = _chunks(server, n=2, max_tokens=6, temperature=0.8, seed=5, ignore_eos=True, **extra)
    for i in range(2):
        mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == i]
        assert mine[0]["delta"]["role"] == "assistant"
        assert mine[0]["delta"]["content"], mine[0]  # a token's text, not "" (no chunk before the first token)
        assert all("role" not in c["delta"] or c["delta"]["role"] is None for c in mine[1:])
        assert mine[-1]["finish_reason"] == "length"


def test_a_forced_tool_call_opens_with_the_call(server):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}}]
    chunks = _chunks(server, max_tokens=20, tools=tools, tool_choice={"type": "function", "function": {"name": "f"}})
    first = chunks[0]["choices"][0]["delta"]
    assert first["role"] == "assistant" and first["tool_calls"][0]["function"]["name"] == "f"


def test_the_openai_sdk_reads_the_stream(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=4, temperature=0, stream=True, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content


def test_continuous_usage_stats_put_the_usage_so_far_in_every_chunk(server):
    # vLLM's extension, which load generators (GuideLLM, vllm bench) send with include_usage
    chunks = _chunks(server, n=2, max_tokens=5, temperature=0.8, seed=3, ignore_eos=True,
                     stream_options={"include_usage": True, "continuous_usage_stats": True})
    counts = [c["usage"]["completion_tokens"] for c in chunks]
    assert counts == sorted(counts) and counts[0] == 1 and counts[-1] == 10  # both choices' tokens so far
    assert all(c["usage"]["prompt_tokens"] == chunks[0]["usage"]["prompt_tokens"] > 0 for c in chunks)
    assert all(c["usage"]["total_tokens"] == c["usage"]["prompt_tokens"] + c["usage"]["completion_tokens"]
               for c in chunks)
    plain = _chunks(server, max_tokens=3, ignore_eos=True, stream_options={"include_usage": True})
    assert all(c["usage"] is None for c in plain[:-1]) and plain[-1]["usage"]["completion_tokens"] == 3
