"""The chat-completions request body: pydantic models (no torch) and the checks that turn a bad one
into a 400 before any work is done.

- `ChatCompletionRequest` and its parts (messages, text / image_url content parts, stream options,
  response format), plus SliME's `slime_selection` extension. Unknown fields are rejected, never
  ignored; types are strict (no `"2"` for an integer, no `"yes"` for a boolean), as OpenAI's API
  has them; content parts are tagged by hand so that a bad part gets its own error.
- Per-message checks (a message's fields fit its role: tool_calls, tool_call_id, content, images,
  detail) as a validator, raised as `request_check`s whose 400 names the field.
- Range checks and float32 floors (a tiny temperature is greedy; top_p and repetition_penalty are
  floored), `check_supported` (fields of OpenAI's API this server refuses by name,
  `UNSUPPORTED_FIELDS`, and limits on n and stop) and `check_unicode` (lone UTF-16 surrogates).

A request builds its own `SamplingParams` (`to_sampling_params`); the server's limits that depend
on settings (messages and images per request, the token budget) are `server.prepare`'s.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator
from pydantic_core import PydanticCustomError

from model.sampling_params import SamplingParams

from .errors import REQUEST_CHECK, APIError, bad_request

# Fields of OpenAI's API that this server does not implement: a 400 names them.
UNSUPPORTED_FIELDS = ("functions", "function_call", "logit_bias",
                      "audio", "modalities", "prediction", "store", "metadata", "service_tier",
                      "reasoning_effort", "web_search_options", "verbosity", "prompt_cache_key", "safety_identifier")


class StrictModel(BaseModel):
    """Unknown fields refused, types strict: the base of every request model."""

    model_config = ConfigDict(extra="forbid", strict=True)


# Extensions that gateways write into every request they forward, at these values (vllm-router
# re-serialises chat and completions bodies with SGLang's and vLLM's defaults). Each default is
# what this server does anyway, so it is accepted; any other value is refused by name. The
# reasoning switches are accepted at any value: a SliME checkpoint produces no reasoning text.
GATEWAY_DEFAULTS = {"no_stop_trim": False, "continue_final_message": False, "skip_special_tokens": True,
                    "return_hidden_states": False}
REASONING_SWITCHES = ("separate_reasoning", "stream_reasoning", "include_reasoning")


class GatewayExtensions(BaseModel):
    """Fields a gateway adds with their defaults (`GATEWAY_DEFAULTS`, `REASONING_SWITCHES`)."""

    no_stop_trim: bool = False
    continue_final_message: bool = False
    skip_special_tokens: bool = True
    return_hidden_states: bool = False
    separate_reasoning: bool | None = None
    stream_reasoning: bool | None = None
    include_reasoning: bool | None = None

    def check_gateway_extensions(self) -> None:
        for name, default in GATEWAY_DEFAULTS.items():
            if getattr(self, name) != default:
                raise bad_request(f"'{name}': {str(getattr(self, name)).lower()} is not supported by this server "
                                  f"(only its default, {str(default).lower()})", param=name,
                                  code="unsupported_parameter")


def sampling_fields(req) -> dict[str, Any]:
    """The sampling knobs chat and completions requests share, at the engine's defaults where unset."""
    return dict(temperature=1.0 if req.temperature is None else req.temperature, top_p=req.top_p or 1.0,
                top_k=req.top_k or 0, seed=req.seed, presence_penalty=req.presence_penalty or 0.0,
                frequency_penalty=req.frequency_penalty or 0.0, repetition_penalty=req.repetition_penalty or 1.0,
                stop=req.stop_list, ignore_eos=req.ignore_eos)


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


class ImageURL(StrictModel):
    url: str
    detail: Literal["auto", "high", "low"] | None = None


class ImagePart(StrictModel):
    type: Literal["image_url"]
    image_url: ImageURL


def _part_kind(v: Any) -> str | None:
    kind = v.get("type") if isinstance(v, dict) else getattr(v, "type", None)
    return {"text": "TextPart", "image_url": "ImagePart"}.get(kind) if isinstance(kind, str) else None


def _content_kind(v: Any) -> str | None:
    return "str" if isinstance(v, str) else "list[parts]" if isinstance(v, list) else None


# Tagged by hand (tag names the 400's `param` leaves out), so that a bad part gets its own error
# ("messages.0.content.0.image_url: Input should be a valid dictionary"), not the string branch's.
ContentPart = Annotated[
    Union[Annotated[TextPart, Tag("TextPart")], Annotated[ImagePart, Tag("ImagePart")]],
    Discriminator(_part_kind, custom_error_type="invalid_content_part",
                  custom_error_message="a content part must be an object with type 'text' or 'image_url'")]
Content = Annotated[
    Union[Annotated[str, Tag("str")], Annotated[list[ContentPart], Tag("list[parts]"), Field(min_length=1)]],
    Discriminator(_content_kind, custom_error_type="invalid_content",
                  custom_error_message="content must be a string or a non-empty list of content parts")]


class ToolCallFunction(StrictModel):
    name: str
    arguments: str  # JSON text


class ToolCall(StrictModel):
    id: str
    type: Literal["function"]
    function: ToolCallFunction


def request_check(message: str, field: str = "") -> PydanticCustomError:
    """A request check's failure, raised in a validator: a 400 whose param is the failing model's
    location and `field` within it (`messages[1]` + `tool_calls`)."""
    return PydanticCustomError(REQUEST_CHECK, message, {"field": field})


class ChatMessage(StrictModel):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Union[Content, None] = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant: calls it made in an earlier turn
    tool_call_id: str | None = None  # tool: which call this is the result of

    @model_validator(mode="after")
    def _fits_its_role(self) -> "ChatMessage":
        if self.tool_calls and self.role != "assistant":
            raise request_check("only assistant messages carry tool_calls", "tool_calls")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise request_check("tool messages, and only they, need tool_call_id")
        if self.content is None and self.role != "assistant":
            raise request_check("content is required", "content")
        for j, part in enumerate(self.content if isinstance(self.content, list) else []):
            if isinstance(part, ImagePart) and self.role != "user":
                raise request_check("only user messages can carry images", f"content[{j}]")
            if isinstance(part, ImagePart) and part.image_url.detail == "low":
                raise request_check("detail 'low' is not supported: SliME always slices the image",
                                    f"content[{j}].image_url.detail")
        return self


class StreamOptions(StrictModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's extension (load generators send it): usage in every chunk


class JSONSchemaFormat(StrictModel):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(StrictModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class FunctionDefinition(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(StrictModel):
    type: Literal["function"]
    function: FunctionDefinition


class ToolChoiceFunction(StrictModel):
    name: str


class NamedToolChoice(StrictModel):
    type: Literal["function"]
    function: ToolChoiceFunction


# Torch seeds are 64-bit; n > 1 seeds its choices seed, seed + 1, ...
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
# The sampler works in float32: a temperature this small is greedy (as vLLM has it), and top_p /
# repetition_penalty below these floors would underflow to 0 (0-division, NaN probabilities)
# without changing which tokens can be drawn.
GREEDY_BELOW = 1e-5
TOP_P_FLOOR = 1e-30
REPETITION_PENALTY_FLOOR = 1e-6


class ChatCompletionRequest(GatewayExtensions):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
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
    tools: list[Tool] | None = Field(None, min_length=1, max_length=64)
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    # SliME extension: per-image grid and kept-token mask in the final chunk / response.
    slime_selection: bool = False
    parallel_tool_calls: bool | None = None  # accepted: a forced call is always exactly one
    # Present so that they can be refused by name.
    functions: Any = None
    function_call: Any = None
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

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        check_unicode(data)
        return data

    @field_validator("temperature")
    @classmethod
    def _tiny_temperature_is_greedy(cls, v: float | None) -> float | None:
        return 0.0 if v is not None and v < GREEDY_BELOW else v

    @field_validator("top_p")
    @classmethod
    def _top_p_floor(cls, v: float | None) -> float | None:
        return None if v is None else max(v, TOP_P_FLOOR)

    @field_validator("repetition_penalty")
    @classmethod
    def _repetition_penalty_floor(cls, v: float | None) -> float | None:
        return None if v is None else max(v, REPETITION_PENALTY_FLOOR)

    def to_sampling_params(self, max_tokens: int, grammar: tuple[str, str] | None) -> SamplingParams:
        """The engine's sampling parameters for this request (`max_tokens` as budgeted, `grammar`
        compiled)."""
        return SamplingParams(max_tokens=max_tokens, logprobs=self.logprobs, top_logprobs=self.top_logprobs or 0,
                              grammar=grammar, **sampling_fields(self))

    def check_supported(self, *, max_n: int, max_stop: int) -> None:
        for name in UNSUPPORTED_FIELDS:
            if getattr(self, name) is not None:
                raise bad_request(f"'{name}' is not supported by this server", param=name, code="unsupported_parameter")
        self.check_gateway_extensions()
        rf = self.response_format
        if rf is not None and rf.type == "json_schema" and (rf.json_schema is None or rf.json_schema.schema_ is None):
            raise bad_request("response_format json_schema needs json_schema.schema", param="response_format.json_schema")
        if rf is not None and rf.type != "json_schema" and rf.json_schema is not None:
            raise bad_request("json_schema is only allowed with type 'json_schema'", param="response_format.json_schema")
        choice = self.tool_choice
        if choice is not None and choice != "none" and not self.tools:
            raise bad_request("tool_choice needs tools", param="tool_choice")
        if self.tools and (choice is None or choice == "auto"):
            raise bad_request("tool_choice 'auto' is not supported: SliME checkpoints have no tool-call format, so "
                              "the model cannot choose between answering and calling; name a function "
                              "({'type': 'function', 'function': {'name': ...}}), or use 'required' or 'none'",
                              param="tool_choice", code="unsupported_parameter")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in {t.function.name for t in self.tools or []}:
            raise bad_request(f"tool_choice names '{choice.function.name}', which is not among the tools",
                              param="tool_choice.function.name")
        if self.tools and len({t.function.name for t in self.tools}) != len(self.tools):
            raise bad_request("tool names must be unique", param="tools")
        if self.stop_list and (self.calls_tool or (rf is not None and rf.type != "text")):
            raise bad_request("stop cannot be combined with structured output (it could cut the document short)",
                              param="stop")
        if self.calls_tool and rf is not None and rf.type != "text":
            raise bad_request("response_format cannot be combined with a forced tool call", param="response_format")
        if self.n > max_n:
            raise bad_request(f"n must be at most {max_n}", param="n")
        if self.top_logprobs and not self.logprobs:
            raise bad_request("top_logprobs needs logprobs: true", param="top_logprobs")
        if len(self.stop_list) > max_stop:
            raise bad_request(f"at most {max_stop} stop sequences are allowed", param="stop")
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed with stream: true", param="stream_options")

    @property
    def calls_tool(self) -> bool:
        """The answer must be a tool call (tool_choice 'required' or a named function)."""
        return bool(self.tools) and self.tool_choice not in (None, "none", "auto")

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


def check_unicode(data: Any) -> None:
    """400 for a lone UTF-16 surrogate (`"\\ud800"`) in any key or string: JSON escapes allow one,
    but it is not Unicode; the tokenizer and the UTF-8 response writer would fail on it."""
    stack: list[tuple[Any, str]] = [(data, "")]
    while stack:  # no recursion: the body's nesting depth is the client's choice
        value, path = stack.pop()
        if isinstance(value, dict):
            for k, v in value.items():
                key_path = f"{path}.{k}" if path else str(k)
                if isinstance(k, str) and not _is_unicode(k):
                    _surrogate_error(path or None)
                stack.append((v, key_path))
        elif isinstance(value, list):
            stack.extend((v, f"{path}.{i}") for i, v in enumerate(value))
        elif isinstance(value, str) and not _is_unicode(value):
            _surrogate_error(path or None)


def _is_unicode(s: str) -> bool:
    if s.isascii():  # O(1) for str: the common case, base64 images included
        return True
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _surrogate_error(param: str | None) -> None:
    where = f" in {param.encode('ascii', 'backslashreplace').decode()}" if param else ""
    raise APIError(400, f"request body is not valid JSON: a lone UTF-16 surrogate escape{where} is not Unicode",
                   param=param, code="invalid_json")


# -- responses (what this server sends; serialised with exclude_unset, so optional fields appear
# only where set: `usage` on chunks only with stream_options.include_usage, `slime` on request;
# `object` and `role` have no defaults, so that they are always set) ---------------------------
class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprobOut(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobOut]


class Usage(BaseModel):
    prompt_tokens: int  # every position the LLM saw, image rows included
    completion_tokens: int
    total_tokens: int


class FunctionCallOut(BaseModel):
    name: str
    arguments: str  # JSON text


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"]
    function: FunctionCallOut


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ToolCallOut] | None = None


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: str | None


class ImageSelection(BaseModel):
    """The `slime_selection` extension: what SliME did with one image."""

    grid: list[int] | None
    views: int
    global_tokens: int
    local_tokens: int
    local_kept: int
    kept_mask: str | None = None  # one 0/1 per local token, raster order of the whole image


class SliMEReport(BaseModel):
    images: list[ImageSelection]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    slime: SliMEReport | None = None


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChoiceLogprobs | None
    finish_reason: str | None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    slime: SliMEReport | None = None


def dump(model: BaseModel) -> str:
    return model.model_dump_json(exclude_unset=True)
