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


def engine_error(error) -> APIError:
    """A server.engine.types.EngineError as the API answers it."""
    from .engine.types import ErrorKind

    status, type_, code = {
        ErrorKind.INVALID_REQUEST: (400, "invalid_request_error", "context_length_exceeded"),
        ErrorKind.MODEL_ERROR: (500, "server_error", "model_error"),
        ErrorKind.RETRY: (503, "unavailable", "retry"),
        ErrorKind.UNAVAILABLE: (503, "unavailable", "engine_unavailable"),
    }[error.kind]
    headers = {"Retry-After": "1"} if status == 503 else None
    return APIError(status, error.message, type=type_, code=code, headers=headers)
