"""Clients no one here wrote, as users point them at the server: LangChain's ChatOpenAI (chat
completions, and the Responses API with `use_responses_api=True`) and LiteLLM's OpenAI-compatible
provider; text, an image, streaming and structured output."""

from __future__ import annotations

import importlib
import os

import pytest
from PIL import Image
from pydantic import BaseModel, Field

from tests.live import data_url, photo
from tests.tools import missing_tool

MODEL = "tiny"


def _need(module: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        missing_tool(f"{module} is not installed (pip install -e '.[dev]')")


@pytest.fixture(scope="module")
def image_url() -> str:
    return data_url(Image.open(photo("extreme_ironing.jpg")).convert("RGB").resize((336, 252)), fmt="JPEG")


class Pet(BaseModel):  # bounded, so that the tiny random model's answer ends
    kind: str = Field(max_length=8)
    legs: int = Field(ge=0, le=8)


@pytest.fixture(scope="module", params=[False, True], ids=["chat", "responses"])
def chat_model(server, request):
    lc = _need("langchain_openai")
    return lc.ChatOpenAI(model=MODEL, base_url=server.url + "/v1", api_key="unused", temperature=0, max_tokens=6,
                         max_retries=0, use_responses_api=request.param)


def test_langchain_invokes_and_streams(chat_model, image_url):
    from langchain_core.messages import HumanMessage

    answer = chat_model.invoke("Say something.")
    assert isinstance(answer.content, (str, list)) and answer.text
    assert 0 < answer.usage_metadata["output_tokens"] <= 6
    api = "resp_" if chat_model.use_responses_api else "chatcmpl-"
    assert answer.response_metadata["id"].startswith(api)  # it went through the API it names
    picture = HumanMessage(content=[{"type": "text", "text": "What is unusual here?"},
                                    {"type": "image_url", "image_url": {"url": image_url}}])
    seen = chat_model.invoke([picture])
    assert seen.usage_metadata["input_tokens"] > 576  # the image's rows
    chunks = list(chat_model.stream("Say something."))
    assert "".join(c.text for c in chunks) == answer.text  # greedy: the same tokens streamed


def test_langchain_structured_output(chat_model):
    structured = chat_model.model_copy(update={"max_tokens": 200}).with_structured_output(Pet, method="json_schema")
    pet = structured.invoke("A pet, as JSON.")
    assert isinstance(pet, Pet)


@pytest.fixture(scope="module")
def litellm():
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # no fetch of its price list from GitHub
    return _need("litellm")


def test_litellm_openai_compatible_provider(server, litellm, image_url):
    kw = dict(model="openai/" + MODEL, api_base=server.url + "/v1", api_key="unused", max_tokens=5, temperature=0)
    r = litellm.completion(messages=[{"role": "user", "content": "Say something."}], **kw)
    assert r.choices[0].message.content and r.usage.completion_tokens <= 5
    stream = litellm.completion(messages=[{"role": "user", "content": "Say something."}], stream=True, **kw)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == r.choices[0].message.content
    seen = litellm.completion(messages=[{"role": "user", "content": [
        {"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": image_url}}]}], **kw)
    assert seen.usage.prompt_tokens > 576
    pet = litellm.completion(messages=[{"role": "user", "content": "A pet, as JSON."}], response_format=Pet,
                             **{**kw, "max_tokens": 200})
    assert Pet.model_validate_json(pet.choices[0].message.content)


def _ttft(server) -> tuple[float, float]:
    return (server.metric("slime_time_to_first_token_seconds_sum"),
            server.metric("slime_time_to_first_token_seconds_count"))


@pytest.mark.slow
def test_guidellm_measures_the_ttft_we_measure(server, tiny_dir, tmp_path):
    """A load generator of the field times the first token at the first data chunk: with a
    role-only chunk sent on acceptance it reported a fraction of our TTFT."""
    import json
    import subprocess

    from tests.tools import tool

    guidellm = tool("guidellm", "guidellm (pip install -e '.[dev]')")
    sum0, n0 = _ttft(server)
    out = subprocess.run([guidellm, "run", "--backend",
                          f"kind=openai_http,target={server.url},model={MODEL},request_format=/v1/chat/completions",
                          "--profile", "kind=concurrent,streams=16", "--constraint", "kind=max_requests,count=64",
                          "--tokenizer", f"kind=hf_auto,model={tiny_dir}",
                          "--data", "kind=synthetic_text,prompt_tokens=512,output_tokens=32",
                          "--output", "kind=json,path=out.json", "--disable-console"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    bench = json.loads((tmp_path / "out.json").read_text())["benchmarks"][0]
    assert len(bench["requests"]["successful"]) == 64 and not bench["requests"]["errored"]
    theirs = bench["metrics"]["time_to_first_token_ms"]["successful"]["mean"] / 1000
    sum1, n1 = _ttft(server)
    assert n1 - n0 == 64
    ours = (sum1 - sum0) / 64  # from the engine's arrival: theirs adds HTTP and preparation
    assert abs(theirs - ours) <= 0.2 * ours + 0.05, (theirs, ours)
