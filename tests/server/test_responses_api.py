"""POST /v1/responses through the official SDK (`responses.create`, `responses.stream`,
`responses.parse`) and over raw HTTP: text, images, schemas, named function tools, streamed events
in the order the SDK accumulates them, and the stateless API's 400s."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from PIL import Image
from pydantic import BaseModel, Field

from tests.live import data_url, photo

MODEL = "tiny"
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def image_url() -> str:
    return data_url(Image.open(photo("extreme_ironing.jpg")).convert("RGB").resize((336, 252)), fmt="JPEG")


def _events(server, **body) -> list[dict]:
    body = {"model": MODEL, "input": "hello", "stream": True, **body}
    with httpx.stream("POST", server.url + "/v1/responses", json=body, timeout=60) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = list(r.iter_lines())
    names = [line[7:] for line in lines if line.startswith("event: ")]
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    assert names == [e["type"] for e in events]  # each event's name line names its data
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


def test_a_string_input_answers_like_the_chat_api(client):
    r = client.responses.create(model=MODEL, input="Say something.", max_output_tokens=6, **GREEDY)
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say something."}],
                                          max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    assert r.object == "response" and r.id.startswith("resp_") and r.model == MODEL
    assert r.output[0].type == "message" and r.output[0].role == "assistant"
    assert r.output_text == chat.choices[0].message.content  # the same prompt, the same greedy tokens
    assert r.usage.input_tokens == chat.usage.prompt_tokens and r.usage.output_tokens == 6
    assert r.usage.total_tokens == r.usage.input_tokens + 6
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"  # cut at 6 tokens


def test_instructions_and_items_with_an_image(client, image_url):
    r = client.responses.create(model=MODEL, instructions="Be brief.", max_output_tokens=4, input=[
        {"role": "user", "content": [{"type": "input_text", "text": "What is unusual here?"},
                                     {"type": "input_image", "image_url": image_url}]}], **GREEDY)
    chat = client.chat.completions.create(model=MODEL, max_tokens=4, temperature=0, extra_body={"ignore_eos": True},
                                          messages=[{"role": "system", "content": "Be brief."},
                                                    {"role": "user", "content": [
                                                        {"type": "text", "text": "What is unusual here?"},
                                                        {"type": "image_url", "image_url": {"url": image_url}}]}])
    assert r.output_text == chat.choices[0].message.content
    assert r.usage.input_tokens == chat.usage.prompt_tokens > 576  # the image's rows are counted


def test_a_stream_sends_the_semantic_events_in_order(server):
    events = _events(server, max_output_tokens=5, temperature=0, ignore_eos=True)
    kinds = [e["type"] for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    assert deltas and all(d["delta"] for d in deltas)  # no empty delta: the first one is the first token
    text = "".join(d["delta"] for d in deltas)
    done = events[-1]["response"]
    assert done["output"][0]["content"][0]["text"] == text == events[-4]["text"]
    assert done["usage"]["output_tokens"] == 5 and done["incomplete_details"] == {"reason": "max_output_tokens"}
    assert {e["response"]["id"] for e in (events[0], events[1], events[-1])} == {done["id"]}


def test_the_sdk_reads_a_streamed_answer_with_an_image(client, image_url):
    body = dict(model=MODEL, max_output_tokens=6, input=[{"role": "user", "content": [
        {"type": "input_text", "text": "Describe it."}, {"type": "input_image", "image_url": image_url}]}], **GREEDY)
    events = list(client.responses.create(stream=True, **body))
    assert events[0].type == "response.created" and events[-1].type == "response.incomplete"
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == events[-1].response.output_text == client.responses.create(**body).output_text


class City(BaseModel):  # bounded, so that the tiny random model's answer ends
    name: str = Field(max_length=10)
    population: int = Field(ge=0, le=10**6)


def test_the_sdk_stream_helper_accumulates_a_parsed_answer(client):
    # the helper's final response needs `response.completed`: a schema's grammar ends the answer
    with client.responses.stream(model=MODEL, input="A city, as JSON.", text_format=City, max_output_tokens=200,
                                 temperature=0) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert final.status == "completed" and final.output_text == "".join(deltas)
    assert isinstance(final.output_parsed, City)


def test_parse_with_a_pydantic_model_follows_its_schema(client):
    r = client.responses.parse(model=MODEL, input="A city, as JSON.", text_format=City, max_output_tokens=200,
                               temperature=0)
    assert r.status == "completed"
    assert isinstance(r.output_parsed, City)


def test_json_object_format_gives_json(client):
    r = client.responses.create(model=MODEL, input="JSON please.", text={"format": {"type": "json_object"}},
                                max_output_tokens=200, temperature=0)
    assert r.status == "completed" and isinstance(json.loads(r.output_text), dict)


TOOL = {"type": "function", "name": "get_weather", "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                       "required": ["city"], "additionalProperties": False}}


def test_a_named_function_tool_is_called(client):
    r = client.responses.create(model=MODEL, input="Weather in Paris?", tools=[TOOL], max_output_tokens=60,
                                tool_choice={"type": "function", "name": "get_weather"}, temperature=0)
    call = r.output[0]
    assert r.status == "completed" and call.type == "function_call" and call.name == "get_weather"
    assert call.call_id.startswith("call_") and "city" in json.loads(call.arguments)
    # the agent's next turn: the call and its result go back as input items
    follow = client.responses.create(model=MODEL, tools=[TOOL], tool_choice="none", max_output_tokens=3, input=[
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": '{"celsius": 21}'},
        {"role": "user", "content": "So?"}], **GREEDY)
    assert follow.output[0].type == "message" and follow.usage.output_tokens == 3


def test_a_streamed_function_call(client):
    with client.responses.stream(model=MODEL, input="Weather?", tools=[TOOL], max_output_tokens=60,
                                 tool_choice="required", temperature=0) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_response()
    assert "response.function_call_arguments.delta" in kinds and kinds[-1] == "response.completed"
    call = final.output[0]
    assert call.type == "function_call" and "city" in json.loads(call.arguments)


@pytest.mark.parametrize("body, param", [
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"store": True}, "store"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"background": True}, "background"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file_1"}]}]}, "input[0].content[0]"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "input.0.content.0"),
    ({"input": [{"role": "user", "content": "a"}, {"role": "system", "content": [
        {"type": "input_image", "image_url": "data:,"}]}]}, "input[1].content[0]"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "data:,", "detail": "low"}]}]},
     "input[0].content[0].image_url.detail"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input.0"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format"),
    ({"max_output_tokens": 10**6}, "max_output_tokens"),
    ({"tools": [TOOL]}, "tool_choice"),  # 'auto': SliME has no tool-call format to choose with
    ({"surprise": 1}, "surprise"),
])
def test_what_a_stateless_server_refuses_is_a_clear_400(server, body, param):
    r = httpx.post(server.url + "/v1/responses", json={"model": MODEL, "input": "hi", **body}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


def test_the_sdk_raises_the_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="gpt-4o", input="hi")
    with pytest.raises(openai.BadRequestError, match="previous_response_id"):
        client.responses.create(model=MODEL, input="hi", previous_response_id="resp_x")
