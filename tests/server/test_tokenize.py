"""POST /tokenize and /detokenize: a prompt or a chat's messages -> ids and the count admission and
usage use (image rows included), ids -> text; bad input is a 400."""

from __future__ import annotations

import httpx
import pytest
from PIL import Image

from tests.live import data_url, image_message, photo

MODEL = "tiny"


def _post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=30)


def test_a_prompt_round_trips(server):
    r = _post(server, "/tokenize", {"model": MODEL, "prompt": "hello world", "return_token_strs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["count"] == len(body["tokens"]) == len(body["token_strs"]) and body["max_model_len"] > 0
    plain = _post(server, "/tokenize", {"prompt": "hello world", "add_special_tokens": False}).json()
    assert plain["tokens"] == body["tokens"][1:]  # without the BOS
    back = _post(server, "/detokenize", {"model": MODEL, "tokens": plain["tokens"]})
    assert back.status_code == 200 and back.json()["prompt"].strip() == "hello world"


def test_a_chat_counts_what_usage_counts(server, client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}]
    body = _post(server, "/tokenize", {"model": MODEL, "messages": messages}).json()
    usage = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1).usage
    assert body["count"] == usage.prompt_tokens == len(body["tokens"]) and body["images"] == []


def test_image_rows_are_counted_with_their_grid(server, client):
    img = Image.open(photo("extreme_ironing.jpg")).convert("RGB").resize((672, 336))
    messages = [image_message("What is this?", data_url(img))]
    body = _post(server, "/tokenize", {"messages": messages}).json()
    (image,) = body["images"]
    assert body["tokens"].count(-200) == 1
    assert body["count"] == len(body["tokens"]) - 1 + image["rows"]
    usage = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1).usage
    # rows before selection: exact without a local branch, an upper bound with one (selection keeps fewer)
    assert usage.prompt_tokens == body["count"] if image["exact"] else usage.prompt_tokens <= body["count"]
    assert image["grid"] is None or len(image["grid"]) == 2


@pytest.mark.parametrize("path, body, param", [
    ("/tokenize", {}, None),
    ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, None),
    ("/tokenize", {"prompt": 3}, "prompt"),
    ("/tokenize", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:image/png;base64,AAAA"}}]}]}, "messages[0].content[0].image_url.url"),
    ("/tokenize", {"messages": [{"role": "assistant", "content": "b"}]}, "messages"),
    ("/detokenize", {"tokens": [-1]}, "tokens.0"),
    ("/detokenize", {"tokens": [10**9]}, "tokens.0"),
    ("/detokenize", {"tokens": "abc"}, "tokens"),
])
def test_bad_input_is_a_400(server, path, body, param):
    r = _post(server, path, body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_another_model_is_a_404(server):
    assert _post(server, "/tokenize", {"model": "gpt-4o", "prompt": "a"}).status_code == 404
