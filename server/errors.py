"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError


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


# the error type of a request check written as a validator (`protocol.request_check`): its context
# names the field, under the location of the model that failed it
REQUEST_CHECK = "request_check"


def validation_error(e: ValidationError, *, skip: frozenset[str] = frozenset(), prefix: str = "") -> APIError:
    """A pydantic ValidationError as a 400 naming the field of its first error: pydantic's location
    (`messages.0.content`, the names in `skip` -- union tags, not fields a client wrote -- left out),
    or for a request check the failing model's location and the field it names
    (`messages[0].tool_calls`, as the image URL checks name theirs). `prefix`: where the validated
    model sits in the request, when it is built from one (`input[2]`)."""
    err = e.errors()[0]
    loc = [x for x in err["loc"] if str(x) not in skip]
    if err["type"] == REQUEST_CHECK:
        path = _bracketed(loc, prefix)
        field = err["ctx"]["field"]
        return bad_request(err["msg"], param=(f"{path}.{field}" if path and field else path or field) or None)
    param = ".".join([prefix, *map(str, loc)] if prefix else map(str, loc)) or None
    if err["type"] == "extra_forbidden":
        return APIError(400, f"'{param}' is not a supported parameter", param=param, code="unsupported_parameter")
    return bad_request(f"{param}: {err['msg']}" if param else err["msg"], param=param)


def _bracketed(loc: list, prefix: str) -> str:
    """("messages", 0) -> "messages[0]"."""
    out = prefix
    for x in loc:
        out += f"[{x}]" if isinstance(x, int) else f".{x}" if out else str(x)
    return out


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
