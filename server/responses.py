"""The Responses API (`POST /v1/responses`) over the chat service: a request is translated into a
chat request (`responses_protocol`), runs the same path, and its answer is written back as a
`response` object, or streamed as the API's semantic events (`response.created`,
`response.output_item.added`, `response.output_text.delta`, ..., `response.completed`), in the order
and shapes the official SDK's stream accumulator expects."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, AsyncIterator

from .chat import ChatService, merged_events
from .errors import APIError, engine_error
from .protocol import ChatCompletion, ChatCompletionRequest
from .responses_protocol import ResponsesRequest, chat_param
from .structured import tool_call

# finish reason -> (status, incomplete_details)
_INCOMPLETE = {"length": {"reason": "max_output_tokens"}}


class ResponsesService:
    def __init__(self, chat: ChatService):
        self.chat = chat

    def _translate(self, req: ResponsesRequest) -> ChatCompletionRequest:
        try:
            return req.to_chat()
        except APIError as e:
            e.param = chat_param(e.param)
            raise

    async def create(self, req: ResponsesRequest) -> dict[str, Any]:
        chat_req = self._translate(req)
        try:
            done = await self.chat.complete(chat_req)
        except APIError as e:
            e.param = chat_param(e.param)
            raise
        return _from_completion(req, done)

    async def stream(self, req: ResponsesRequest) -> AsyncIterator[str]:
        """Validate and submit first (errors become HTTP errors), then return the event stream."""
        chat_req = self._translate(req)
        try:
            _, streams = await self.chat.start(chat_req)
        except APIError as e:
            e.param = chat_param(e.param)
            raise
        return self._events(req, chat_req, streams)

    async def _events(self, req: ResponsesRequest, chat_req: ChatCompletionRequest, streams: list) -> AsyncIterator[str]:
        out = EventWriter(req, self.chat.model_name)
        events = merged_events(streams)
        text: list[str] = []
        # A tool call is written when complete (its grammar guarantees the JSON); text streams.
        streaming_text = not chat_req.calls_tool
        try:
            yield out.event("response.created", response=out.response("in_progress"))
            yield out.event("response.in_progress", response=out.response("in_progress"))
            if streaming_text:
                yield out.open_message()
            async for _, ev in events:
                if ev.error is not None:
                    err = engine_error(ev.error)
                    if self.chat.metrics:  # the status line went out long ago: count it here
                        self.chat.metrics.error(err)
                    yield out.event("response.failed", response=out.response(
                        "failed", error={"code": err.code or "server_error", "message": err.message}))
                    return
                if ev.text:
                    text.append(ev.text)
                    if streaming_text:
                        yield out.text_delta(ev.text)
                if ev.finish_reason:
                    yield self._finish(out, chat_req, "".join(text), ev, streaming_text)
        finally:
            await events.aclose()  # closing an engine stream early aborts its request
            for s in streams:
                await s.aclose()

    @staticmethod
    def _finish(out: "EventWriter", chat_req: ChatCompletionRequest, answer: str, ev, streaming_text: bool) -> str:
        """The closing events: the output item done, then the whole response."""
        if chat_req.calls_tool and ev.finish_reason == "stop":
            closing = out.function_call(tool_call(chat_req, answer))
        else:
            closing = ""
            if not streaming_text:  # a tool call cut short: what there is, as text
                closing = out.open_message() + (out.text_delta(answer) if answer else "")
            closing += out.close_message(answer)
        incomplete = _INCOMPLETE.get(ev.finish_reason)
        final = out.response("incomplete" if incomplete else "completed",
                             usage=_usage(ev.prompt_tokens, ev.completion_tokens), incomplete_details=incomplete)
        return closing + out.event("response.incomplete" if incomplete else "response.completed", response=final)


def _usage(prompt: int, completion: int) -> dict[str, Any]:
    # cached_tokens: prefix-cache hits are not reported per request (yet); reasoning: none
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": prompt + completion}


def _message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if status != "in_progress" \
        else []
    return {"id": item_id, "type": "message", "status": status, "role": "assistant", "content": content}


def _function_call_item(item_id: str, call: dict, status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "function_call", "status": status, "call_id": call["id"],
            "name": call["function"]["name"], "arguments": call["function"]["arguments"]}


def _body(req: ResponsesRequest, rid: str, created: int, model: str, status: str, output: list, *,
          usage: dict | None = None, incomplete_details: dict | None = None, error: dict | None = None) -> dict:
    """A `response` object; the request's settings echoed back as OpenAI does."""
    fmt = req.text.format if req.text is not None and req.text.format is not None else None
    text_format: dict[str, Any] = {"type": "text"} if fmt is None else fmt.model_dump(by_alias=True, exclude_none=True)
    tool_choice: Any = req.tool_choice if isinstance(req.tool_choice, str) or req.tool_choice is None \
        else req.tool_choice.model_dump()
    return {"id": rid, "object": "response", "created_at": created, "status": status, "model": model,
            "output": output, "usage": usage, "error": error, "incomplete_details": incomplete_details,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "temperature": 1.0 if req.temperature is None else req.temperature,
            "top_p": 1.0 if req.top_p is None else req.top_p, "parallel_tool_calls": req.parallel_tool_calls is not False,
            "tool_choice": tool_choice or "auto", "tools": [t.model_dump(exclude_none=True) for t in req.tools or []],
            "text": {"format": text_format}, "store": False, "metadata": req.metadata or {},
            "truncation": "disabled", "previous_response_id": None, "reasoning": None, "user": req.user}


def _from_completion(req: ResponsesRequest, done: ChatCompletion) -> dict[str, Any]:
    choice = done.choices[0]
    msg = choice.message
    if msg.tool_calls:
        output = [_function_call_item("fc_" + uuid.uuid4().hex, c.model_dump(), "completed") for c in msg.tool_calls]
    else:
        output = [_message_item("msg_" + uuid.uuid4().hex, msg.content or "", "completed")]
    incomplete = _INCOMPLETE.get(choice.finish_reason or "")
    u = done.usage
    return _body(req, "resp_" + uuid.uuid4().hex, done.created, done.model,
                 "incomplete" if incomplete else "completed", output,
                 usage=_usage(u.prompt_tokens, u.completion_tokens), incomplete_details=incomplete)


class EventWriter:
    """The SSE events of one streamed response, numbered; it keeps the output items so far, so that
    the final `response` carries them all."""

    def __init__(self, req: ResponsesRequest, model: str):
        self.req, self.model = req, model
        self.rid = "resp_" + uuid.uuid4().hex
        self.created = int(time.time())
        self.seq = 0
        self.output: list[dict] = []
        self.message_id = ""

    def event(self, kind: str, **fields: Any) -> str:
        body = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return f"event: {kind}\ndata: {json.dumps(body, ensure_ascii=False)}\n\n"

    def response(self, status: str, **kw: Any) -> dict:
        return _body(self.req, self.rid, self.created, self.model, status, list(self.output), **kw)

    def open_message(self) -> str:
        self.message_id = "msg_" + uuid.uuid4().hex
        index = len(self.output)
        self.output.append(_message_item(self.message_id, "", "in_progress"))
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        return (self.event("response.output_item.added", output_index=index, item=self.output[index])
                + self.event("response.content_part.added", item_id=self.message_id, output_index=index,
                             content_index=0, part=part))

    def text_delta(self, text: str) -> str:
        return self.event("response.output_text.delta", item_id=self.message_id, output_index=len(self.output) - 1,
                          content_index=0, delta=text, logprobs=[])

    def close_message(self, text: str) -> str:
        index = len(self.output) - 1
        item = _message_item(self.message_id, text, "completed")
        self.output[index] = item
        return (self.event("response.output_text.done", item_id=self.message_id, output_index=index,
                           content_index=0, text=text, logprobs=[])
                + self.event("response.content_part.done", item_id=self.message_id, output_index=index,
                             content_index=0, part=item["content"][0])
                + self.event("response.output_item.done", output_index=index, item=item))

    def function_call(self, call: dict) -> str:
        item_id = "fc_" + uuid.uuid4().hex
        index = len(self.output)
        added = _function_call_item(item_id, {**call, "function": {**call["function"], "arguments": ""}},
                                    "in_progress")
        self.output.append(added)
        arguments = call["function"]["arguments"]
        done = _function_call_item(item_id, call, "completed")
        chunks = (self.event("response.output_item.added", output_index=index, item=dict(added))
                  + self.event("response.function_call_arguments.delta", item_id=item_id, output_index=index,
                               delta=arguments)
                  + self.event("response.function_call_arguments.done", item_id=item_id, output_index=index,
                               name=done["name"], arguments=arguments))
        self.output[index] = done
        return chunks + self.event("response.output_item.done", output_index=index, item=done)
