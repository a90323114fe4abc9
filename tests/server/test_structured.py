"""Structured outputs through the real server and the `openai` SDK. The tiny checkpoint's weights
are random, so its unconstrained answers are gibberish: an answer that parses and validates
proves the grammar did it."""

import json

import httpx
import jsonschema
import pydantic
import pytest
from PIL import Image

from server.settings import Settings
from tests.live import LiveServer, data_url, image_message

MODEL = "tiny"
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "height": {"type": "number", "minimum": 0.5, "maximum": 2.5},
        "role": {"enum": ["pilot", "cook", "clerk"]},
        "nickname": {"type": ["string", "null"], "maxLength": 8},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "minItems": 1, "maxItems": 3},
        "code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                     "zip": {"type": "integer", "minimum": 1000, "maximum": 99999}},
                    "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "height", "role", "nickname", "tags", "code", "address"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather at a place",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                    "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                                       "required": ["zone"], "additionalProperties": False}}}


@pytest.fixture(scope="module", params=[False, True], ids=["in-process", "engine-process"])
def srv(request, tiny_dir):
    with LiveServer(Settings(model=str(tiny_dir), device="cpu", engine_process=request.param)) as s:
        yield s


@pytest.fixture(scope="module")
def oc(srv):
    import openai

    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _image() -> str:
    return data_url(Image.new("RGB", (120, 90), (30, 160, 90)))


def _streamed(stream) -> tuple[list[str], list[str | None]]:
    texts, finishes = {}, {}
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            finishes[c.index] = c.finish_reason or finishes.get(c.index)
    return [texts[i] for i in sorted(texts)], [finishes[i] for i in sorted(finishes)]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("temperature", [0, 1.0], ids=["greedy", "sampled"])
@pytest.mark.parametrize("with_image", [False, True], ids=["text", "image"])
def test_every_answer_follows_its_schema(oc, stream, temperature, with_image):
    messages = [image_message("Describe a person.", _image()) if with_image else
                {"role": "user", "content": "Describe a person."}]
    kw = dict(model=MODEL, messages=messages, response_format=FORMAT, max_tokens=400, n=2,
              temperature=temperature, seed=3)
    if stream:
        texts, finishes = _streamed(oc.chat.completions.create(**kw, stream=True))
    else:
        r = oc.chat.completions.create(**kw)
        texts, finishes = [c.message.content for c in r.choices], [c.finish_reason for c in r.choices]
    assert len(texts) == 2 and finishes == ["stop", "stop"], (texts, finishes)
    for text in texts:
        jsonschema.validate(json.loads(text), PERSON)


def test_json_object_mode_gives_an_object(oc):
    r = oc.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "JSON please"}],
                                   response_format={"type": "json_object"}, max_tokens=300, temperature=0)
    # random weights may write a long object: either complete (and an object) or cut by max_tokens
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:
        assert r.choices[0].finish_reason == "length" and r.choices[0].message.content.startswith("{")


def test_the_sdk_parses_into_a_pydantic_model(oc):
    class Pet(pydantic.BaseModel):
        kind: str = pydantic.Field(max_length=8)
        legs: int = pydantic.Field(ge=0, le=8)
        vaccinated: bool

    r = oc.beta.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": "A pet?"}],
                                       response_format=Pet, max_tokens=200, temperature=0)
    pet = r.choices[0].message.parsed
    assert isinstance(pet, Pet) and 0 <= pet.legs <= 8


def test_running_out_of_tokens_is_length_with_a_prefix_of_a_document(oc):
    r = oc.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], response_format=FORMAT,
                                   max_tokens=5, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.content.startswith("{")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_named_tool_call_has_valid_arguments(oc, stream):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER, TIME],
              tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=200, temperature=0)
    if stream:
        calls, finish, ids = {}, None, set()
        for chunk in oc.chat.completions.create(**kw, stream=True):
            for c in chunk.choices:
                for tc in c.delta.tool_calls or []:
                    ids |= {tc.id} if tc.id else set()
                    if tc.function.name:
                        calls["name"] = tc.function.name
                    calls["arguments"] = calls.get("arguments", "") + (tc.function.arguments or "")
                finish = c.finish_reason or finish
        assert len(ids) == 1
        name, arguments = calls["name"], calls["arguments"]
    else:
        r = oc.chat.completions.create(**kw)
        msg, finish = r.choices[0].message, r.choices[0].finish_reason
        assert msg.content is None and len(msg.tool_calls) == 1 and msg.tool_calls[0].id.startswith("call_")
        name, arguments = msg.tool_calls[0].function.name, msg.tool_calls[0].function.arguments
    assert finish == "tool_calls" and name == "get_weather"
    jsonschema.validate(json.loads(arguments), WEATHER["function"]["parameters"])


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_required_tool_call_picks_one_of_the_tools_with_valid_arguments(oc, stream):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "What now?"}], tools=[WEATHER, TIME],
              tool_choice="required", max_tokens=200, temperature=1.0, seed=5)
    if stream:
        call, finish = None, None
        for chunk in oc.chat.completions.create(**kw, stream=True):
            for c in chunk.choices:
                call = (c.delta.tool_calls or [call])[0]
                finish = c.finish_reason or finish
        name, arguments = call.function.name, call.function.arguments
    else:
        r = oc.chat.completions.create(**kw)
        finish = r.choices[0].finish_reason
        name, arguments = r.choices[0].message.tool_calls[0].function.name, \
            r.choices[0].message.tool_calls[0].function.arguments
    tool = {"get_weather": WEATHER, "get_time": TIME}[name]
    assert finish == "tool_calls"
    jsonschema.validate(json.loads(arguments), tool["function"]["parameters"])


def test_tool_results_are_accepted_in_a_later_turn(oc):
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city":"Paris","unit":"C"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
                {"role": "user", "content": "So?"}]
    r = oc.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], tool_choice="none",
                                   max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")
    # the tool turn reached the prompt: the prompt is longer than without it
    short = oc.chat.completions.create(model=MODEL, messages=[messages[0], messages[3]], max_tokens=1)
    assert r.usage.prompt_tokens > short.usage.prompt_tokens + 10


@pytest.mark.parametrize("body,param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}}}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {f"p{i}": {"type": "string", "description": "d" * 200}
                                         for i in range(400)}}}}}, "response_format.json_schema.schema"),
    ({"tools": [WEATHER]}, "tool_choice"),  # auto (the default with tools)
    ({"tools": [WEATHER], "tool_choice": "auto"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}], "tool_choice": "required"},
     "tools.0.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "strin"}}}],
      "tool_choice": "required"}, "tools"),
])
def test_bad_schemas_and_tool_settings_are_400s_naming_the_field(srv, body, param):
    r = httpx.post(srv.url + "/v1/chat/completions", timeout=30, json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"], err
    assert httpx.get(srv.url + "/health").status_code == 200


def test_stop_strings_cannot_cut_a_forced_tool_call(srv):
    r = httpx.post(srv.url + "/v1/chat/completions", timeout=30, json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20, "tools": [WEATHER, TIME],
        "tool_choice": "required", "stop": ["}"]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop"


def test_stop_strings_cannot_cut_a_schema_document(srv):
    r = httpx.post(srv.url + "/v1/chat/completions", timeout=30, json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20,
        "response_format": {"type": "json_object"}, "stop": ["}"]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop"


def test_logprobs_under_a_grammar_are_numbers(oc):
    r = oc.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], response_format=FORMAT,
                                   max_tokens=30, temperature=0, logprobs=True, top_logprobs=5)
    for lp in r.choices[0].logprobs.content:
        assert isinstance(lp.logprob, float) and lp.logprob > float("-inf")
        assert all(isinstance(t.logprob, float) and t.logprob > float("-inf") for t in lp.top_logprobs)


def test_a_tool_call_cut_by_max_tokens_is_returned_as_it_streams(oc):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER],
              tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=4, temperature=0)
    r = oc.chat.completions.create(**kw)
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "length" and call.function.name == "get_weather"
    streamed = ""
    for chunk in oc.chat.completions.create(**kw, stream=True):
        for c in chunk.choices:
            for tc in c.delta.tool_calls or []:
                streamed += tc.function.arguments or ""
    assert streamed == call.function.arguments and streamed.startswith("{")


def test_n_2_tool_calls_each_validate(oc):
    r = oc.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Time?"}], tools=[TIME],
                                   tool_choice="required", n=2, max_tokens=50, temperature=1.0, seed=9,
                                   parallel_tool_calls=False)
    assert len(r.choices) == 2
    for c in r.choices:
        assert c.finish_reason == "tool_calls" and c.message.tool_calls[0].function.name == "get_time"
        jsonschema.validate(json.loads(c.message.tool_calls[0].function.arguments), TIME["function"]["parameters"])
