"""FastAPI dependencies: the app's typed state and the chat service once it is ready."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request

from ..errors import APIError

if TYPE_CHECKING:
    from ..state import AppState
    from ..chat import ChatService
    from ..responses import ResponsesService


def get_state(request: Request) -> "AppState":
    return request.app.state.slime


def get_chat(state: Annotated["AppState", Depends(get_state)]) -> "ChatService":
    if state.chat is None or not state.ready:
        raise APIError(503, "the model is not ready" if not state.shutting_down else "the server is shutting down",
                       type="unavailable", code="not_ready", headers={"Retry-After": "5"})
    return state.chat


def get_responses(chat: Annotated["ChatService", Depends(get_chat)]) -> "ResponsesService":
    from ..responses import ResponsesService

    return ResponsesService(chat)  # a thin translation over the chat service: nothing to keep


StateDep = Annotated["AppState", Depends(get_state)]
ChatDep = Annotated["ChatService", Depends(get_chat)]
ResponsesDep = Annotated["ResponsesService", Depends(get_responses)]
