"""Request bodies and answers shared by the JSON routes: a body parsed into its pydantic model with
OpenAI-style 400s (off the event loop for large bodies), and a non-streamed answer that is
cancelled when its client goes away."""

from __future__ import annotations

import asyncio
import json
from typing import Any, Awaitable, TypeVar

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from ..errors import APIError, validation_error

M = TypeVar("M", bound=BaseModel)

# union members' tags in pydantic's error locations (see protocol.py), not fields a client wrote
_UNION_TAGS = frozenset({"TextPart", "ImagePart", "str", "list[parts]", "InputText", "InputImage", "OutputText",
                         "MessageItem", "FunctionCallItem", "FunctionCallOutputItem"})


def json_body_schema(name: str) -> dict:
    """openapi_extra for a route whose body is the component `name` (parsing stays ours, for 400s)."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{name}"}}}}}


# streamed answers (stream: true) are Server-Sent Events
STREAMED = {200: {"content": {"text/event-stream": {"schema": {}}}}}  # events: chunks, then [DONE] on chat


async def parse_body(request: Request, model: type[M]) -> M:
    ctype = request.headers.get("content-type", "")
    if "application/json" not in ctype:
        raise APIError(415, "Content-Type must be application/json", code="unsupported_media_type")
    raw = await request.body()
    # Bodies with images are megabytes: parse them off the event loop.
    if len(raw) > 65536:
        return await asyncio.to_thread(validate_body, raw, model)
    return validate_body(raw, model)


def validate_body(raw: bytes | str, model: type[M]) -> M:
    try:
        data: Any = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise APIError(400, "request body is not valid JSON", code="invalid_json") from None
    except RecursionError:
        raise APIError(400, "request body is nested too deeply", code="invalid_json") from None
    return validate_data(data, model)


def validate_data(data: Any, model: type[M]) -> M:
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e, skip=_UNION_TAGS) from None


def event_stream(gen) -> StreamingResponse:
    return StreamingResponse(gen, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def answer_unless_gone(request: Request, work: Awaitable[Any], dump) -> Response:
    """The JSON answer of `work`; cancelled (499) once the client disconnects."""
    task = asyncio.ensure_future(work)
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
