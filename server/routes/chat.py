"""POST /v1/chat/completions: parse (off the event loop for large bodies), then stream or collect."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import ValidationError

from ..errors import APIError
from ..protocol import ChatCompletionRequest, dump
from .deps import ChatDep

router = APIRouter()


def _request_schema() -> dict:
    """The request body's schema, documented in /openapi.json (parsing stays ours, for 400s)."""
    return {"$ref": "#/components/schemas/ChatCompletionRequest"}


@router.post("/v1/chat/completions", openapi_extra={"requestBody": {
    "required": True, "content": {"application/json": {"schema": _request_schema()}}}})
async def chat_completions(request: Request, chat: ChatDep):
    body = await _parse(request)
    if body.stream:
        gen = await chat.stream(body)
        return StreamingResponse(gen, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    task = asyncio.create_task(chat.complete(body))
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return Response(dump(task.result()), media_type="application/json")
            if await request.is_disconnected():
                task.cancel()
                return Response(status_code=499)
    finally:
        if not task.done():
            task.cancel()



async def _parse(request: Request) -> ChatCompletionRequest:
    ctype = request.headers.get("content-type", "")
    if "application/json" not in ctype:
        raise APIError(415, "Content-Type must be application/json", code="unsupported_media_type")
    raw = await request.body()
    # Bodies with images are megabytes: parse them off the event loop.
    if len(raw) > 65536:
        return await asyncio.to_thread(_validate, raw)
    return _validate(raw)


# union members' tags in pydantic's error locations (see protocol.py), not fields a client wrote
_UNION_TAGS = {"TextPart", "ImagePart", "str", "list[parts]"}


def _validate(raw: bytes) -> ChatCompletionRequest:
    try:
        data: Any = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise APIError(400, "request body is not valid JSON", code="invalid_json") from None
    except RecursionError:
        raise APIError(400, "request body is nested too deeply", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = [str(x) for x in err["loc"] if str(x) not in _UNION_TAGS]
        param = ".".join(loc) or None
        if err["type"] == "extra_forbidden":
            raise APIError(400, f"'{param}' is not a supported parameter", param=param,
                           code="unsupported_parameter") from None
        raise APIError(400, f"{param}: {err['msg']}" if param else err["msg"], param=param) from None
