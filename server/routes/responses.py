"""POST /v1/responses: the Responses API, stateless (see server.responses)."""

from __future__ import annotations

import json

from fastapi import APIRouter, Request

from ..responses_protocol import ResponsesRequest
from .body import STREAMED, answer_unless_gone, event_stream, json_body_schema, parse_body
from .deps import ResponsesDep

router = APIRouter()


@router.post("/v1/responses", openapi_extra=json_body_schema("ResponsesRequest"),
             responses=STREAMED)
async def responses(request: Request, service: ResponsesDep):
    body = await parse_body(request, ResponsesRequest)
    if body.stream:
        return event_stream(await service.stream(body))
    return await answer_unless_gone(request, service.create(body), lambda r: json.dumps(r, ensure_ascii=False))
