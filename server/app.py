"""App factory: `create_app(settings)` builds the FastAPI app; its lifespan loads the model in a
worker thread, warms it up, starts the engine, and stops it on shutdown."""

from __future__ import annotations

import asyncio
import json
import logging
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from fastapi.middleware.cors import CORSMiddleware

from .errors import APIError
from .metrics import Metrics
from .middleware import APIKeyMiddleware, BodyLimitMiddleware
from .protocol import ChatCompletionRequest
from .settings import Settings

log = logging.getLogger("slime.server")


class AppState:
    """Everything the routes need, typed (no ad-hoc app.state lookups)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.metrics = Metrics()
        self.chat = None  # ChatService once loaded
        self.engine = None
        self.ready = False
        self.load_error: str | None = None
        self.shutting_down = False


def build_service(settings: Settings, metrics: Metrics):
    """Load the model and start the engine, in this process or in its own (blocking; runs in a
    worker thread). -> (ChatService, EngineClient)"""
    from model.resample import warm_up as warm_up_resampler

    from .chat import ChatService
    from .engine.factory import start_engine

    warm_up_resampler()  # image preprocessing runs here, in the API process: compile before serving
    engine = start_engine(settings.engine_config(), metrics.observe_engine)
    return ChatService(settings, engine, metrics), engine


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def create_app(settings: Settings | None = None, *, service_factory=build_service) -> FastAPI:
    settings = settings or Settings()
    state = AppState(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async def load():
            try:
                state.chat, state.engine = await asyncio.to_thread(service_factory, settings, state.metrics)
                state.ready = True
            except Exception as e:  # noqa: BLE001 - reported by /ready and the log
                log.exception("model loading failed")
                state.load_error = str(e)

        task = asyncio.create_task(load())
        yield
        state.shutting_down = True
        state.ready = False
        task.cancel()
        if state.engine is not None:
            await asyncio.to_thread(state.engine.stop)

    app = FastAPI(title="SliME Serve", version="0.1.0", lifespan=lifespan)
    app.state.slime = state

    def count_error(err: APIError) -> None:
        state.metrics.errors.labels(err.type, str(err.status)).inc()

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError):
        count_error(err)
        return _error_response(err)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        err = APIError(500, "internal server error", type="server_error")
        count_error(err)
        return _error_response(err)

    app.openapi = _openapi(app, settings.model_id)  # type: ignore[method-assign]

    # Pure ASGI middleware; the last added is the outermost.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes, on_error=count_error)
    protected = ("/v1/", "/metrics") if settings.protect_metrics else ("/v1/",)
    app.add_middleware(APIKeyMiddleware, keys=settings.api_key, protected=protected, on_error=count_error)
    if settings.cors_origins:
        wildcard = "*" in settings.cors_origins
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], allow_credentials=not wildcard)

    static_dir = Path(__file__).parent / "static"
    app.mount("/static", StaticFiles(directory=static_dir), name="static")

    @app.get("/", include_in_schema=False)
    async def playground():
        return FileResponse(static_dir / "index.html")

    @app.get("/health")
    async def health():
        # Liveness: fails only when restarting is the cure (the model failed to load, or the
        # engine loop died after starting); loading and draining are still alive.
        if state.load_error or (state.engine is not None and not state.engine.alive and not state.shutting_down):
            return JSONResponse({"status": "dead", "detail": state.load_error or "engine loop stopped"},
                                status_code=503)
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if state.ready and state.engine is not None and state.engine.alive:
            return {"status": "ready"}
        detail = state.load_error or ("shutting down" if state.shutting_down else "loading")
        return JSONResponse({"status": "not ready", "detail": detail}, status_code=503)

    @app.get("/metrics", response_class=PlainTextResponse,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def metrics():
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        chat = _service(state)
        return {"object": "list", "data": [{"id": chat.model_name, "object": "model", "created": 0,
                                            "owned_by": "slime-serve", "max_model_len": settings.max_model_len}]}

    @app.post("/v1/chat/completions", openapi_extra={"requestBody": {
        "required": True, "content": {"application/json": {"schema": _request_schema()}}}})
    async def chat_completions(request: Request):
        chat = _service(state)
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
                    return task.result()
                if await request.is_disconnected():
                    task.cancel()
                    return Response(status_code=499)
        finally:
            if not task.done():
                task.cancel()

    return app


def _request_schema() -> dict:
    """The request body's schema, documented in /openapi.json (parsing stays ours, for 400s)."""
    return {"$ref": "#/components/schemas/ChatCompletionRequest"}


def _openapi(app: FastAPI, model_name: str):
    def build() -> dict:
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            body = ChatCompletionRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(body.pop("$defs", {}))
            body["properties"]["model"]["enum"] = [model_name]
            components["ChatCompletionRequest"] = body
            app.openapi_schema = schema
        return app.openapi_schema

    return build


def _service(state: AppState):
    if state.chat is None or not state.ready:
        raise APIError(503, "the model is not ready" if not state.shutting_down else "the server is shutting down",
                       type="unavailable", code="not_ready", headers={"Retry-After": "5"})
    return state.chat


async def _parse(request: Request) -> ChatCompletionRequest:
    ctype = request.headers.get("content-type", "")
    if "application/json" not in ctype:
        raise APIError(415, "Content-Type must be application/json", code="unsupported_media_type")
    raw = await request.body()
    # Bodies with images are megabytes: parse them off the event loop.
    if len(raw) > 65536:
        return await asyncio.to_thread(_validate, raw)
    return _validate(raw)


def _validate(raw: bytes) -> ChatCompletionRequest:
    try:
        data: Any = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise APIError(400, "request body is not valid JSON", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = [str(x) for x in err["loc"] if not str(x).startswith(("TextPart", "ImagePart", "str", "list["))]
        param = ".".join(loc) or None
        if err["type"] == "extra_forbidden":
            raise APIError(400, f"'{param}' is not a supported parameter", param=param,
                           code="unsupported_parameter") from None
        raise APIError(400, f"{param}: {err['msg']}" if param else err["msg"], param=param) from None
