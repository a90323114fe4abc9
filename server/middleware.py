"""Pure ASGI middleware (no BaseHTTPMiddleware, so client-disconnect detection keeps working):
request-body limit enforced while reading, and API-key auth on the inference routes."""

from __future__ import annotations

import hmac
import json
from typing import Iterable

from .errors import APIError


async def _send_error(send, err: APIError) -> None:
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """413 for a body over `max_bytes`: from Content-Length up front, else while streaming it in."""

    def __init__(self, app, *, max_bytes: int, on_error=None):
        self.app = app
        self.max_bytes = max_bytes
        self.on_error = on_error

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        err = APIError(413, f"request body exceeds {self.max_bytes} bytes", code="request_too_large")
        for k, v in scope.get("headers", []):
            if k == b"content-length":
                try:
                    too_big = int(v) > self.max_bytes
                except ValueError:
                    too_big = False
                if too_big:
                    if self.on_error:
                        self.on_error(err)
                    return await _send_error(send, err)
        seen = 0
        started = False

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if self.on_error:
                self.on_error(err)
            if not started:
                await _send_error(send, err)


class APIKeyMiddleware:
    """Bearer-token check, in constant time, on every route under the protected prefixes."""

    def __init__(self, app, *, keys: Iterable[str], protected: tuple[str, ...] = ("/v1/",), on_error=None):
        self.app = app
        self.keys = [k.encode() for k in keys]
        self.protected = protected
        self.on_error = on_error

    def _authorised(self, header: bytes | None) -> bool:
        if header is None or not header.lower().startswith(b"bearer "):
            return False
        token = header[7:].strip()
        ok = False
        for key in self.keys:  # compare against every key, always
            ok |= hmac.compare_digest(token, key)
        return ok

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.keys or scope["method"] == "OPTIONS" \
                or not scope["path"].startswith(self.protected):
            return await self.app(scope, receive, send)
        header = dict(scope.get("headers", [])).get(b"authorization")
        if not self._authorised(header):
            err = APIError(401, "Incorrect API key provided", type="invalid_request_error", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
            if self.on_error:
                self.on_error(err)
            return await _send_error(send, err)
        return await self.app(scope, receive, send)
