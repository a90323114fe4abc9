"""The fields a gateway adds to every request it forwards: vllm-router re-serialises chat and
completions bodies with SGLang's and vLLM's defaults (bodies as captured from vllm-router 0.1.17).
At those defaults they are accepted; any other value is a 400 naming the field."""

from __future__ import annotations

import httpx
import pytest

MODEL = "tiny"
MESSAGES = [{"role": "user", "content": "hi"}]

CHAT_AS_FORWARDED = {"model": MODEL, "messages": MESSAGES, "stream": False, "max_tokens": 4, "logprobs": False,
                     "no_stop_trim": False, "ignore_eos": False, "continue_final_message": False,
                     "skip_special_tokens": True, "separate_reasoning": True, "stream_reasoning": True,
                     "return_hidden_states": False, "include_reasoning": True}
COMPLETION_AS_FORWARDED = {"model": MODEL, "prompt": "hi", "max_tokens": 4, "stream": False, "echo": False,
                           "no_stop_trim": False, "ignore_eos": False, "skip_special_tokens": True,
                           "return_hidden_states": False}


@pytest.mark.parametrize("path,body", [("/v1/chat/completions", CHAT_AS_FORWARDED),
                                       ("/v1/completions", COMPLETION_AS_FORWARDED)])
def test_a_gateway_forwarded_body_is_served(server, path, body):
    r = httpx.post(server.url + path, json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize("field,value", [("no_stop_trim", True), ("continue_final_message", True),
                                         ("skip_special_tokens", False), ("return_hidden_states", True)])
def test_a_non_default_value_is_refused_by_name(server, field, value):
    for path, body in (("/v1/chat/completions", CHAT_AS_FORWARDED), ("/v1/completions", COMPLETION_AS_FORWARDED)):
        if field not in body:
            continue
        r = httpx.post(server.url + path, json={**body, field: value}, timeout=60)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == field and err["code"] == "unsupported_parameter"


def test_reasoning_switches_take_any_value(server):
    body = {**CHAT_AS_FORWARDED, "separate_reasoning": False, "stream_reasoning": False, "include_reasoning": False}
    assert httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).status_code == 200
