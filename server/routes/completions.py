"""POST /v1/completions (see server.completions)."""

from __future__ import annotations

import json

from fastapi import APIRouter, Request

from ..completions import CompletionRequest, CompletionService
from .body import STREAMED, answer_unless_gone, event_stream, json_body_schema, parse_body
from .deps import ChatDep

router = APIRouter()


@router.post("/v1/completions", openapi_extra=json_body_schema("CompletionRequest"), responses=STREAMED)
async def completions(request: Request, chat: ChatDep):
    body = await parse_body(request, CompletionRequest)
    service = CompletionService(chat)
    if body.stream:
        return event_stream(await service.stream(body))
    return await answer_unless_gone(request, service.create(body), lambda r: json.dumps(r, ensure_ascii=False))
