"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# How an engine-level failure reaches a client: (status, type, code)
_ENGINE_ERRORS = {
    "invalid_request": (400, "invalid_request_error", None),
    "model_error": (500, "server_error", "model_error"),
    "retry": (503, "unavailable", "retry"),
    "unavailable": (503, "unavailable", "engine_unavailable"),
}


def engine_error(error) -> APIError:
    """A server.engine.types.EngineError as the API answers it."""
    status, type_, code = _ENGINE_ERRORS[error.kind.value]
    headers = {"Retry-After": "1"} if status == 503 else None
    return APIError(status, error.message, type=type_, code=code, headers=headers)
