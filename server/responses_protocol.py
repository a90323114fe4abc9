"""The Responses API's request body (`POST /v1/responses`, stateless) and its translation into a
chat-completions request, so that both APIs share one path: checks, preparation, the guarded image
fetcher, grammars and the engine.

- Input: a string, or items -- messages (`input_text`, `input_image`, `output_text` parts, or a
  string), `function_call` and `function_call_output` (an agent's earlier turns).
- `instructions` -> a leading system message; `max_output_tokens`; temperature / top_p / seed;
  `text.format` (`text`, `json_object`, `json_schema`) -> `response_format`; function tools and
  `tool_choice` -> chat tools.
- Stateless: `store: true`, `previous_response_id`, `conversation` and `background` are refused by
  name (no response is kept to refer back to).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator

from .errors import bad_request, validation_error
from .protocol import (SEED_MAX, SEED_MIN, ChatCompletionRequest, ChatMessage, FunctionDefinition, ImagePart, ImageURL,
                       JSONSchemaFormat, NamedToolChoice, ResponseFormat, StreamOptions, StrictModel, TextPart, Tool,
                       ToolCall, ToolCallFunction, ToolChoiceFunction, check_unicode)


class InputText(StrictModel):
    type: Literal["input_text"]
    text: str


class InputImage(StrictModel):
    type: Literal["input_image"]
    image_url: str | None = None
    file_id: str | None = None  # refused: there is no Files API here
    detail: Literal["auto", "high", "low"] | None = None


class OutputText(StrictModel):
    """An earlier assistant answer, replayed by the client."""
    type: Literal["output_text"]
    text: str
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None


def _part_kind(v: Any) -> str | None:
    kind = v.get("type") if isinstance(v, dict) else getattr(v, "type", None)
    return {"input_text": "InputText", "input_image": "InputImage", "output_text": "OutputText"}.get(kind) \
        if isinstance(kind, str) else None


InputPart = Annotated[
    Union[Annotated[InputText, Tag("InputText")], Annotated[InputImage, Tag("InputImage")],
          Annotated[OutputText, Tag("OutputText")]],
    Discriminator(_part_kind, custom_error_type="invalid_content_part",
                  custom_error_message="a content part must be an object with type 'input_text', 'input_image' "
                                       "or 'output_text'")]


def _str_or_list(v: Any) -> str | None:
    return "str" if isinstance(v, str) else "list[parts]" if isinstance(v, list) else None


# Tagged by hand (as protocol.Content), so that a bad item or part gets its own error.
MessageContent = Annotated[
    Union[Annotated[str, Tag("str")], Annotated[list[InputPart], Tag("list[parts]"), Field(min_length=1)]],
    Discriminator(_str_or_list, custom_error_type="invalid_content",
                  custom_error_message="content must be a string or a non-empty list of content parts")]


class MessageItem(StrictModel):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: MessageContent
    id: str | None = None
    status: str | None = None


class FunctionCallItem(StrictModel):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(StrictModel):
    type: Literal["function_call_output"]
    call_id: str
    output: Union[str, list[InputText]]
    id: str | None = None
    status: str | None = None


def _item_kind(v: Any) -> str | None:
    if not isinstance(v, dict):
        return None
    kind = v.get("type", "message")  # an "easy" message has no type
    return {"message": "MessageItem", "function_call": "FunctionCallItem",
            "function_call_output": "FunctionCallOutputItem"}.get(kind) if isinstance(kind, str) else None


InputItem = Annotated[
    Union[Annotated[MessageItem, Tag("MessageItem")], Annotated[FunctionCallItem, Tag("FunctionCallItem")],
          Annotated[FunctionCallOutputItem, Tag("FunctionCallOutputItem")]],
    Discriminator(_item_kind, custom_error_type="invalid_input_item",
                  custom_error_message="an input item must be a message, a function_call or a "
                                       "function_call_output")]


class TextFormat(StrictModel):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, min_length=1, max_length=64)
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextConfig(StrictModel):
    format: TextFormat | None = None
    verbosity: Any = None  # refused by name


class FunctionTool(StrictModel):
    type: Literal["function"]
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionToolChoice(StrictModel):
    type: Literal["function"]
    name: str


# Fields of the Responses API this stateless server does not implement: a 400 names them.
UNSUPPORTED_RESPONSE_FIELDS = ("previous_response_id", "conversation", "background", "prompt", "reasoning",
                               "max_tool_calls", "top_logprobs", "service_tier", "prompt_cache_key",
                               "safety_identifier")


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    input: Annotated[
        Union[Annotated[str, Tag("str")], Annotated[list[InputItem], Tag("list[parts]"), Field(min_length=1)]],
        Discriminator(_str_or_list, custom_error_type="invalid_input",
                      custom_error_message="input must be a string or a non-empty list of input items")]
    instructions: str | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None  # include_obfuscation: nothing to obfuscate here
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)  # extensions, as on chat completions
    ignore_eos: bool = False
    text: TextConfig | None = None
    tools: list[FunctionTool] | None = Field(None, max_length=64)
    tool_choice: Union[Literal["none", "auto", "required"], FunctionToolChoice, None] = None
    parallel_tool_calls: bool | None = None  # accepted: a forced call is always exactly one
    store: bool | None = None
    metadata: dict[str, str] | None = None  # echoed back, as OpenAI does
    user: str | None = None
    truncation: Literal["disabled"] | None = None  # "auto" would drop input silently: refused
    include: list[str] | None = None
    # Present so that they can be refused by name.
    previous_response_id: Any = None
    conversation: Any = None
    background: Any = None
    prompt: Any = None
    reasoning: Any = None
    max_tool_calls: Any = None
    top_logprobs: Any = None
    service_tier: Any = None
    prompt_cache_key: Any = None
    safety_identifier: Any = None

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        check_unicode(data)
        return data

    def check_supported(self) -> None:
        for name in UNSUPPORTED_RESPONSE_FIELDS:
            if getattr(self, name) is not None:
                why = (" (this server keeps no responses: send the whole conversation as input)"
                       if name in ("previous_response_id", "conversation") else "")
                raise bad_request(f"'{name}' is not supported by this server{why}", param=name,
                                  code="unsupported_parameter")
        if self.store:
            raise bad_request("store: true is not supported: this server keeps no responses (send store: false)",
                              param="store", code="unsupported_parameter")
        if self.include:
            raise bad_request("include is not supported by this server", param="include",
                              code="unsupported_parameter")
        if self.text is not None and self.text.verbosity is not None:
            raise bad_request("'text.verbosity' is not supported by this server", param="text.verbosity",
                              code="unsupported_parameter")
        fmt = self.text.format if self.text is not None else None
        if fmt is not None and fmt.type == "json_schema" and (fmt.schema_ is None or not fmt.name):
            raise bad_request("text.format json_schema needs name and schema", param="text.format")
        if fmt is not None and fmt.type != "json_schema" and (fmt.schema_ is not None or fmt.name is not None):
            raise bad_request("name and schema are only allowed with type 'json_schema'", param="text.format")

    # -- translation ------------------------------------------------------------------------------
    def to_chat(self) -> ChatCompletionRequest:
        """The equivalent chat-completions request (checked first: `check_supported`)."""
        self.check_supported()
        messages: list[ChatMessage] = []
        if self.instructions is not None:
            messages.append(ChatMessage(role="system", content=self.instructions))
        items = [MessageItem(role="user", content=self.input)] if isinstance(self.input, str) else self.input
        for i, item in enumerate(items):
            if isinstance(item, MessageItem):
                messages.append(_message(item, i))
            elif isinstance(item, FunctionCallItem):
                call = ToolCall(id=item.call_id, type="function",
                                function=ToolCallFunction(name=item.name, arguments=item.arguments))
                last = messages[-1] if messages else None
                if last is not None and last.role == "assistant" and last.tool_calls and last.content is None:
                    last.tool_calls.append(call)  # parallel calls of one turn: one assistant message
                else:
                    messages.append(ChatMessage(role="assistant", content=None, tool_calls=[call]))
            else:
                output = item.output if isinstance(item.output, str) else "\n".join(p.text for p in item.output)
                messages.append(ChatMessage(role="tool", content=output, tool_call_id=item.call_id))
        fields: dict[str, Any] = dict(model=self.model, messages=messages, stream=self.stream,
                                      max_completion_tokens=self.max_output_tokens, temperature=self.temperature,
                                      top_p=self.top_p, seed=self.seed, user=self.user, ignore_eos=self.ignore_eos,
                                      parallel_tool_calls=self.parallel_tool_calls)
        if self.stream:
            fields["stream_options"] = StreamOptions(include_usage=True)
        fmt = self.text.format if self.text is not None else None
        if fmt is not None and fmt.type != "text":
            fields["response_format"] = ResponseFormat(
                type=fmt.type, json_schema=None if fmt.type != "json_schema" else JSONSchemaFormat.model_validate(
                    {"name": fmt.name, "description": fmt.description, "schema": fmt.schema_, "strict": fmt.strict}))
        if self.tools:
            fields["tools"] = [Tool(type="function", function=FunctionDefinition(
                name=t.name, description=t.description, parameters=t.parameters, strict=t.strict)) for t in self.tools]
        choice = self.tool_choice
        if isinstance(choice, FunctionToolChoice):
            fields["tool_choice"] = NamedToolChoice(type="function", function=ToolChoiceFunction(name=choice.name))
        elif choice is not None:
            fields["tool_choice"] = choice
        return ChatCompletionRequest(**fields)


def _message(item: MessageItem, i: int) -> ChatMessage:
    if isinstance(item.content, str):
        return ChatMessage(role=item.role, content=item.content)
    parts: list[TextPart | ImagePart] = []
    for j, part in enumerate(item.content):
        where = f"input[{i}].content[{j}]"
        if isinstance(part, InputImage):
            if part.file_id is not None or part.image_url is None:
                raise bad_request("input_image needs image_url (a data URL or an http(s) URL); file_id is not "
                                  "supported: there is no Files API here", param=where)
            parts.append(ImagePart(type="image_url", image_url=ImageURL(url=part.image_url, detail=part.detail)))
        else:
            if isinstance(part, OutputText) and item.role != "assistant":
                raise bad_request("output_text parts belong to assistant messages", param=where)
            if isinstance(part, InputText) and item.role == "assistant":
                raise bad_request("assistant messages carry output_text parts", param=where)
            parts.append(TextPart(type="text", text=part.text))
    try:
        return ChatMessage(role=item.role, content=parts)
    except ValidationError as e:  # the message does not fit its role (an image in a system message)
        raise validation_error(e, prefix=f"input[{i}]") from None


# -- what this server sends ---------------------------------------------------------------------
def chat_param(param: str | None) -> str | None:
    """A chat request's field name in an error -> the Responses request's."""
    if param is None:
        return None
    for chat, responses in (("messages", "input"), ("max_completion_tokens", "max_output_tokens"),
                            ("max_tokens", "max_output_tokens"), ("response_format.json_schema.schema",
                                                                  "text.format.schema"),
                            ("response_format", "text.format")):
        if param == chat or param.startswith(chat + ".") or param.startswith(chat + "["):
            return responses + param[len(chat):] if chat != "messages" else "input"
    return param
