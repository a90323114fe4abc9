"""OpenAI chat-completions request models (pydantic, no torch) and their conversion to
SamplingParams. Unknown fields and fields we do not implement are rejected, never ignored."""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from .errors import bad_request

# Fields of OpenAI's API that this server does not implement: a 400 names them.
UNSUPPORTED_FIELDS = ("tools", "tool_choice", "functions", "function_call", "parallel_tool_calls", "logit_bias",
                      "audio", "modalities", "prediction", "store", "metadata", "service_tier",
                      "reasoning_effort", "web_search_options", "verbosity", "prompt_cache_key", "safety_identifier")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "high", "low"] | None = None


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Union[TextPart, ImagePart]


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: Union[str, list[ContentPart], None] = None
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ResponseFormat(_Strict):
    type: str


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    n: int = Field(1, ge=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    user: str | None = None
    ignore_eos: bool = False
    response_format: ResponseFormat | None = None
    # SliME extension: per-image grid and kept-token mask in the final chunk / response.
    slime_selection: bool = False
    # Present so that they can be refused by name.
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: Any = None
    logit_bias: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    store: Any = None
    metadata: Any = None
    service_tier: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None
    verbosity: Any = None
    prompt_cache_key: Any = None
    safety_identifier: Any = None

    def check_supported(self, *, max_n: int, max_stop: int) -> None:
        for name in UNSUPPORTED_FIELDS:
            if getattr(self, name) is not None:
                raise bad_request(f"'{name}' is not supported by this server", param=name, code="unsupported_parameter")
        if self.response_format is not None and self.response_format.type != "text":
            raise bad_request("only response_format {'type': 'text'} is supported", param="response_format",
                              code="unsupported_parameter")
        if self.n > max_n:
            raise bad_request(f"n must be at most {max_n}", param="n")
        if self.top_logprobs and not self.logprobs:
            raise bad_request("top_logprobs needs logprobs: true", param="top_logprobs")
        if len(self.stop_list) > max_stop:
            raise bad_request(f"at most {max_stop} stop sequences are allowed", param="stop")
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed with stream: true", param="stream_options")

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)
