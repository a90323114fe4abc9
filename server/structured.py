"""Structured outputs on the API side: what grammar a request asks for (`response_format`, a
forced tool call), how tools and tool results enter the prompt, and how a constrained answer
becomes `tool_calls`. The engine enforces the grammar (model.grammar)."""

from __future__ import annotations

import json
import uuid

from model.grammar import GrammarSpec, schema_spec

from .protocol import ChatCompletionRequest, ChatMessage, NamedToolChoice, Tool

ANY_OBJECT: dict = {"type": "object"}


def _parameters(tool: Tool) -> dict:
    return tool.function.parameters or ANY_OBJECT


def _forced_tools(req: ChatCompletionRequest) -> list[Tool]:
    """The tools the answer must call one of (empty: no forced call)."""
    if not req.calls_tool:
        return []
    choice = req.tool_choice
    if isinstance(choice, NamedToolChoice):
        return [t for t in req.tools or [] if t.function.name == choice.function.name]
    return list(req.tools or [])  # "required"


def grammar_for(req: ChatCompletionRequest) -> tuple[GrammarSpec | None, str]:
    """-> (the grammar the answer must follow or None, the request field it comes from)."""
    tools = _forced_tools(req)
    if len(tools) == 1:  # the arguments object itself
        return schema_spec(_parameters(tools[0])), "tools"
    if tools:  # one of several: {"name": ..., "arguments": {...}}
        return schema_spec({"anyOf": [
            {"type": "object", "properties": {"name": {"const": t.function.name}, "arguments": _parameters(t)},
             "required": ["name", "arguments"], "additionalProperties": False} for t in tools]}), "tools"
    rf = req.response_format
    if rf is None or rf.type == "text":
        return None, ""
    if rf.type == "json_object":
        return ("json_object", ""), "response_format"
    return schema_spec(rf.json_schema.schema_), "response_format.json_schema.schema"  # type: ignore[union-attr]


def tools_prompt(req: ChatCompletionRequest) -> str | None:
    """A system note describing the functions the answer must call (checkpoints have no tool
    format; the grammar guarantees the shape, the note tells the model what the call is for)."""
    tools = _forced_tools(req)
    if not tools:
        return None
    lines = ["Answer with a function call as JSON."]
    if len(tools) > 1:
        lines.append('Write {"name": <function>, "arguments": <its arguments>} for one of:')
    for t in tools:
        desc = f": {t.function.description}" if t.function.description else ""
        lines.append(f"- {t.function.name}{desc}. Arguments: {json.dumps(_parameters(t), separators=(',', ':'))}")
    if len(tools) == 1:
        lines.append("Write only the arguments object.")
    return "\n".join(lines)


def tool_call_turn(m: ChatMessage) -> str:
    """An earlier assistant turn's tool calls, as text the model reads."""
    calls = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments} for c in m.tool_calls or []]
    return json.dumps(calls, ensure_ascii=False)


def tool_result_turn(m: ChatMessage, text: str) -> str:
    return f"Result of function call {m.tool_call_id}:\n{text}"


def tool_call(req: ChatCompletionRequest, text: str) -> dict:
    """The constrained answer `text` as one OpenAI tool call."""
    tools = _forced_tools(req)
    if len(tools) == 1:
        name, arguments = tools[0].function.name, text
    else:
        obj = json.loads(text)
        name, arguments = obj["name"], json.dumps(obj["arguments"], ensure_ascii=False, separators=(",", ":"))
    return {"id": "call_" + uuid.uuid4().hex[:24], "type": "function", "function": {"name": name, "arguments": arguments}}


def single_forced_tool(req: ChatCompletionRequest) -> str | None:
    """The function name when the answer is that function's arguments (streamable as they come)."""
    tools = _forced_tools(req)
    return tools[0].function.name if len(tools) == 1 else None
