"""POST /tokenize and /detokenize (see server.tokenize)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from ..tokenize import DetokenizeRequest, TokenizeRequest, TokenizeService
from .body import json_body_schema, parse_body
from .deps import ChatDep

router = APIRouter()


@router.post("/tokenize", openapi_extra=json_body_schema("TokenizeRequest"))
async def tokenize(request: Request, chat: ChatDep):
    return await TokenizeService(chat).tokenize(await parse_body(request, TokenizeRequest))


@router.post("/detokenize", openapi_extra=json_body_schema("DetokenizeRequest"))
async def detokenize(request: Request, chat: ChatDep):
    return await TokenizeService(chat).detokenize(await parse_body(request, DetokenizeRequest))
