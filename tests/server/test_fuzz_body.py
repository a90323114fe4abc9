"""Malformed and randomly mutated request bodies against the real server: every answer is a 2xx or
an OpenAI-shaped 4xx, never a 5xx, and the server keeps answering."""

import base64
import io
import json
import math
import random

import httpx
import pytest
from PIL import Image


MODEL = "tiny"
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def http(small):
    with httpx.Client(base_url=small.url, timeout=60) as c:
        yield c


def hi(**extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **extra}


def raw(http, body: bytes, headers=JSON) -> httpx.Response:
    return http.post("/v1/chat/completions", content=body, headers=headers)


def assert_openai_error(r: httpx.Response, status: int | None = None, *, param=None, code=None) -> dict:
    """A 4xx with exactly {"error": {"message", "type", "param", "code"}}."""
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:500])
    if status is not None:
        assert r.status_code == status, r.text[:500]
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
    assert err["param"] is None or isinstance(err["param"], str)
    assert err["code"] is None or isinstance(err["code"], str)
    assert "Traceback" not in r.text
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def server_errors(server) -> float:
    try:
        return server.metric("slime_errors_total", 'status="5')
    except KeyError:
        return 0.0


# -- bodies the JSON parser or the tokenizer choked on (each was a 500) ----------------------------
def _with(body: dict, old: str, new: str) -> bytes:
    text = json.dumps(body)
    assert old in text
    return text.replace(old, new, 1).encode()


@pytest.mark.parametrize("body, param", [
    (_with(hi(), '"hi"', '"\\ud800"'), "messages.0.content"),  # tokenizer: TypeError
    (_with(hi(), '"hi"', '"x \\udfff y"'), "messages.0.content"),
    (_with(hi(messages=[{"role": "user", "content": [{"type": "text", "text": "t"}]}]), '"t"', '"\\udbff"'),
     "messages.0.content.0.text"),
    (_with(hi(), '"tiny"', '"\\ud800"'), "model"),  # the 404 naming the model could not be encoded
    (_with(hi(stop="s"), '"s"', '"\\ud800"'), "stop"),
    (_with(hi(user="u"), '"u"', '"\\udc00"'), "user"),
    (_with(hi(), '"model"', '"\\ud800": 1, "model"'), None),
], ids=["content", "content-low", "text-part", "model", "stop", "user", "key"])
def test_lone_surrogates_are_400(http, body, param):
    err = assert_openai_error(raw(http, body), 400, code="invalid_json")
    assert err["param"] == param


def test_valid_surrogate_pairs_and_other_unicode_still_work(http):
    r = raw(http, _with(hi(), '"hi"', '"\\ud83d\\ude00 \\u00e9 \\u0000 \\uffff"'))
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("body", [
    b'{"model": "tiny", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    b"[" * 100_000,  # unterminated
    b'{"model": "tiny", "x": ' + b'{"a": ' * 2000 + b"1" + b"}" * 2000 + b"}",
    ('{"model": "tiny", "messages": ' + "[" * 3000 + "]" * 3000 + "}").encode("utf-16"),
], ids=["arrays", "unterminated", "objects", "utf-16"])
def test_nesting_too_deep_to_parse_is_400(http, small, body):
    """json.loads raised RecursionError: a 500."""
    before = server_errors(small)
    assert_openai_error(raw(http, body), 400, code="invalid_json")
    assert server_errors(small) == before


def test_deep_but_parseable_nesting_is_a_plain_400(http):
    body = b'{"model": "tiny", "messages": [{"role": "user", "content": ' + b"[" * 500 + b"]" * 500 + b"}]}"
    assert_openai_error(raw(http, body), 400)


@pytest.mark.parametrize("body", [
    b"", b"   ", b"\xef\xbb\xbf", b"null", b"1e999", b'"x"', b"{", b'{"model": "tiny",}', b"{'model': 'tiny'}",
    b'{"model": "tiny", "messages": [{"role": "user", "content": "\xff\xfe"}]}',  # invalid UTF-8
    b'{"model": "tiny", "messages": [{"role": "user", "content": "\xed\xa0\x80"}]}',  # UTF-8-encoded surrogate
    b'{"model": "tiny", "messages": [{"role": "user", "content": "a\x00b"}]}',  # raw control character
    json.dumps(hi()).encode() + b"\x00",
    json.dumps(hi()).replace('"max_tokens": 2', '"max_tokens": ' + "9" * 5000).encode(),  # int-string limit
    json.dumps(hi()).replace('"max_tokens": 2', '"max_tokens": 2' + "0" * 5000 + ".5").encode(),
], ids=lambda b: repr(b[:24]))
def test_unparseable_bodies_are_400(http, body):
    assert_openai_error(raw(http, body), 400)


@pytest.mark.parametrize("extra, param", [
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": float("inf")}, "temperature"),
    ({"top_p": -math.inf}, "top_p"),
    ({"presence_penalty": float("nan")}, "presence_penalty"),
])
def test_nan_and_infinity_literals_are_400(http, extra, param):
    body = json.dumps(hi(**extra)).encode()  # NaN / Infinity literals, which json.loads accepts
    assert b"NaN" in body or b"Infinity" in body
    assert_openai_error(raw(http, body), 400, param=param)


def test_odd_encodings_are_read_or_refused_never_500(http):
    good = json.dumps(hi())
    for body in (good.encode("utf-16"), good.encode("utf-16-le"), good.encode("utf-32"), b"\xef\xbb\xbf" + good.encode()):
        r = raw(http, body)
        assert r.status_code == 200 or 400 <= r.status_code < 500, r.text
    assert_openai_error(raw(http, json.dumps(hi(user="é"), ensure_ascii=False).encode("latin-1")), 400)


# -- wrong types were coerced ("2" -> 2, "yes" -> true, true -> 1): OpenAI refuses them ------------
@pytest.mark.parametrize("extra, param", [
    ({"max_tokens": "2"}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"max_tokens": 2.0}, "max_tokens"),
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 10**30}, "max_tokens"),
    ({"n": True}, "n"),
    ({"n": "1"}, "n"),
    ({"n": 10**30}, "n"),
    ({"logprobs": "yes"}, "logprobs"),
    ({"logprobs": 1}, "logprobs"),
    ({"temperature": "0.5"}, "temperature"),
    ({"temperature": True}, "temperature"),
    ({"top_k": "5"}, "top_k"),
    ({"seed": "1"}, "seed"),
    ({"seed": 2**64}, "seed"),  # torch: "Overflow when unpacking long long", after the engine took it
    ({"seed": -(2**63) - 1}, "seed"),
    ({"stop": [1, 2]}, "stop"),
    ({"stop": 5}, "stop"),
    ({"model": 1}, "model"),
    ({"user": ["u"]}, "user"),
    ({"ignore_eos": "false"}, "ignore_eos"),
    ({"slime_selection": 1}, "slime_selection"),
    ({"messages": "hello"}, "messages"),
    ({"messages": [1]}, "messages.0"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": []}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": [[1, 2]]}]}, "messages.0.content.0"),
    ({"messages": [{"role": "user", "content": ["hi"]}]}, "messages.0.content.0"),
    ({"messages": [{"role": "user", "content": [{"type": "video", "video": "v"}]}]}, "messages.0.content.0"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "data:image/png;base64,AA"}]}]},
     "messages.0.content.0.image_url"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": 3}}]}]},
     "messages.0.content.0.image_url.url"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": None}]}]}, "messages.0.content.0.text"),
    ({"messages": [{"role": "user", "content": "x", "name": 1}]}, "messages.0.name"),
])
def test_wrong_types_are_400_naming_the_field(http, extra, param):
    assert_openai_error(http.post("/v1/chat/completions", json=hi(**extra)), 400, param=param)


IMG = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}


# -- a message's fields must fit its role (ChatMessage's validator): the 400 names the field -------
@pytest.mark.parametrize("messages, param", [
    ([{"role": "user", "content": "x", "tool_calls": [CALL]}], "messages[0].tool_calls"),
    ([{"role": "user", "content": "x"}, {"role": "tool", "content": "42"}], "messages[1]"),
    ([{"role": "user", "content": "x", "tool_call_id": "c1"}], "messages[0]"),
    ([{"role": "user"}], "messages[0].content"),
    ([{"role": "system", "content": None}, {"role": "user", "content": "x"}], "messages[0].content"),
    ([{"role": "assistant", "content": [{"type": "text", "text": "a"}, IMG]}], "messages[0].content[1]"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,", "detail": "low"}}]}],
     "messages[0].content[0].image_url.detail"),
])
def test_a_message_that_does_not_fit_its_role_is_a_400_naming_the_field(http, messages, param):
    err = assert_openai_error(http.post("/v1/chat/completions", json=hi(messages=messages)), 400, param=param)
    assert err["message"] and "messages" not in err["message"].split()[0], err  # the check's words, no loc prefix
    assert http.post("/tokenize", json={"messages": messages}).json()["error"]["param"] == param


def test_an_assistant_turn_that_only_called_tools_needs_no_content(http):
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [CALL]},
                {"role": "tool", "content": "42", "tool_call_id": "c1"}]
    assert http.post("/v1/chat/completions", json=hi(messages=messages)).status_code == 200


@pytest.mark.parametrize("extra", [
    {"temperature": 1e-300}, {"temperature": 1e-40}, {"temperature": 1e-6},
    {"top_p": 1e-300}, {"top_p": 5e-324}, {"top_p": 1e-40, "top_k": 1},
    {"repetition_penalty": 1e-300, "max_tokens": 4}, {"repetition_penalty": 1e-300, "temperature": 1e-5},
])
def test_tiny_sampling_values_sample_instead_of_failing(http, small, extra):
    """float32 underflow in the sampler: NaN probabilities, "model error during prefill" (a 500)."""
    before = server_errors(small)
    r = http.post("/v1/chat/completions", json=hi(**extra))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("length", "stop")
    assert server_errors(small) == before


def test_integral_json_numbers_for_float_fields_still_work(http):
    r = http.post("/v1/chat/completions", json=hi(temperature=1, top_p=1, presence_penalty=0, seed=-1))
    assert r.status_code == 200, r.text


# -- the seeded fuzzer ----------------------------------------------------------------------------
def _tiny_png() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (20, 120, 220)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


PNG_URL = _tiny_png()
FIELDS = ["model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "temperature",
          "top_p", "top_k", "seed", "stop", "n", "presence_penalty", "frequency_penalty", "repetition_penalty",
          "logprobs", "top_logprobs", "user", "ignore_eos", "response_format", "slime_selection", "tools", "metadata"]
STRINGS = ["", "tiny", "hi", "<image>", "\u0000", "é😀", "\ud800", "\udfff x", " " * 3, "data:image/png;base64,",
           PNG_URL, "data:image/png;base64,@@@", "http://127.0.0.1/x.png", "file:///etc/passwd", "a" * 3000,
           "user", "assistant", "system", "developer", "text", "image_url", "auto", "low", "high", "NaN"]


def random_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(12 if depth < 3 else 8)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, 1, 2, -1, 7, 20, 100, 101, 2**31, 2**63, 2**64, -(2**63) - 1, 10**30, -(10**30)])
    if kind == 3:
        return rng.choice([0.0, 0.5, 1.0, 2.0, 2.0000001, -0.5, 1e-300, 5e-324, 1e300, float("nan"), float("inf"),
                           -float("inf"), 1e-5, 0.9999999])
    if kind in (4, 5, 6, 7):
        return rng.choice(STRINGS)
    if kind in (8, 9):
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(FIELDS + ["type", "text", "image_url", "url", "role", "content", "detail"]):
            random_value(rng, depth + 1) for _ in range(rng.randrange(4))}


def random_part(rng: random.Random):
    r = rng.random()
    if r < 0.4:
        return {"type": "text", "text": rng.choice(STRINGS[:8])}
    if r < 0.7:
        part = {"type": "image_url", "image_url": {"url": rng.choice([PNG_URL, PNG_URL, "data:image/png;base64,AAAA",
                                                                      "data:,x", PNG_URL[:60], "ftp://x"])}}
        if rng.random() < 0.3:
            part["image_url"]["detail"] = rng.choice(["auto", "high", "low", "medium", None, 1])
        return part
    return random_value(rng, 2)


def valid_body(rng: random.Random) -> dict:
    content = "hi" if rng.random() < 0.5 else [random_part(rng) for _ in range(rng.randrange(1, 3))]
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": rng.choice([1, 2])}
    if rng.random() < 0.3:
        body["stream"] = True
    if rng.random() < 0.3:
        body["temperature"] = rng.choice([0, 0.7, 1.5])
    return body


def mutate(rng: random.Random, body: dict) -> dict:
    body = json.loads(json.dumps(body))
    for _ in range(rng.randrange(1, 4)):
        op = rng.randrange(7)
        if op == 0:  # any top-level field, any value
            body[rng.choice(FIELDS)] = random_value(rng)
        elif op == 1 and body:
            body.pop(rng.choice(sorted(body)))
        elif op == 2:  # a message's field
            msgs = body.get("messages")
            if isinstance(msgs, list) and msgs and isinstance(msgs[0], dict):
                msgs[0][rng.choice(["role", "content", "name", "extra"])] = random_value(rng)
        elif op == 3:  # more messages, of any role
            msgs = body.get("messages")
            if isinstance(msgs, list):
                msgs.insert(rng.randrange(len(msgs) + 1),
                            {"role": rng.choice(["user", "assistant", "system", "developer", "tool"]),
                             "content": rng.choice(["x", None, [random_part(rng)]])})
        elif op == 4:  # a content part
            msgs = body.get("messages")
            if isinstance(msgs, list) and msgs and isinstance(msgs[0], dict):
                msgs[0]["content"] = [random_part(rng) for _ in range(rng.randrange(0, 4))]
        elif op == 5:  # a sampling value at its edges
            body[rng.choice(["temperature", "top_p", "top_k", "repetition_penalty", "presence_penalty", "seed",
                             "top_logprobs", "n"])] = random_value(rng)
            body["max_tokens"] = rng.choice([1, 2])
        else:  # logprobs, stop, n
            body.update(rng.choice([{"logprobs": True, "top_logprobs": rng.randrange(0, 22)}, {"stop": ["a", "b"]},
                                    {"stop": rng.choice(STRINGS)}, {"n": 2}, {"stream": True, "stream_options":
                                                                                   {"include_usage": True}}]))
    return body


def encode(rng: random.Random, body) -> bytes:
    """JSON text, sometimes damaged at the byte level."""
    data = json.dumps(body).encode() if rng.random() < 0.5 else json.dumps(body, ensure_ascii=False).encode(
        "utf-8", "surrogatepass")
    r = rng.random()
    if r < 0.70:
        return data
    if r < 0.76:
        return data[:rng.randrange(len(data) + 1)]
    if r < 0.82:
        b = bytearray(data)
        for _ in range(rng.randrange(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return bytes(b)
    if r < 0.86:
        return json.dumps(body).encode(rng.choice(["utf-16", "utf-16-be", "utf-32", "utf-8-sig"]))
    if r < 0.90:
        return data.replace(b'"model"', b'"model": "x", "model"', 1)  # duplicate key
    if r < 0.94:
        return b"[" * rng.randrange(900, 3000) + data
    return rng.choice([b"", b"null", b"[]", b"{}", b"\xff\xfe\x00", b"1e999", data * 2])


def check_response(r: httpx.Response, stream: bool) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:500])
    if r.status_code >= 400:
        assert_openai_error(r)
        return
    assert r.status_code == 200, r.text[:300]
    if stream:
        lines = [line for line in r.text.splitlines() if line]
        assert lines[-1] == "data: [DONE]", lines[-3:]
        assert '"server_error"' not in r.text, r.text[-500:]
    else:
        assert r.json()["object"] == "chat.completion"


@pytest.mark.timeout(240)
def test_seeded_fuzz_never_5xx(http, small):
    rng = random.Random(20240611)
    before = server_errors(small)
    statuses: dict[int, int] = {}
    for i in range(400):
        base = valid_body(rng)
        body = base if i % 8 == 0 else mutate(rng, base)
        data = encode(rng, body)
        headers = JSON if rng.random() < 0.95 else rng.choice([{}, {"content-type": "text/plain"}, {
            "content-type": "application/json; charset=utf-16"}])
        r = raw(http, data, headers)
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        try:
            check_response(r, isinstance(body, dict) and body.get("stream") is True)
        except AssertionError as e:
            raise AssertionError(f"body #{i}: {data[:400]!r}") from e
    assert statuses.get(200, 0) > 40 and sum(v for k, v in statuses.items() if k >= 400) > 100, statuses
    assert server_errors(small) == before
    assert http.get("/health").status_code == 200
    assert http.post("/v1/chat/completions", json=hi()).status_code == 200


@pytest.mark.parametrize("field,value", [("stream", "yes"), ("stream_options", {"include_usage": "maybe"})])
def test_errors_on_stream_fields_name_them(small, field, value):
    r = httpx.post(small.url + "/v1/chat/completions", timeout=30, json={
        "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, field: value})
    assert r.status_code == 400
    assert r.json()["error"]["param"].startswith(field), r.json()
