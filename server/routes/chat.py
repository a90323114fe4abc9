"""POST /v1/chat/completions: parse (off the event loop for large bodies), then stream or collect."""

from __future__ import annotations

from fastapi import APIRouter, Request

from ..protocol import ChatCompletionRequest, dump
from .body import STREAMED, answer_unless_gone, event_stream, json_body_schema, parse_body
from .deps import ChatDep

router = APIRouter()


@router.post("/v1/chat/completions", openapi_extra=json_body_schema("ChatCompletionRequest"),
             responses=STREAMED)
async def chat_completions(request: Request, chat: ChatDep):
    body = await parse_body(request, ChatCompletionRequest)
    if body.stream:
        return event_stream(await chat.stream(body))
    return await answer_unless_gone(request, chat.complete(body), dump)
