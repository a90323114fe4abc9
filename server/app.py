"""App factory: `create_app(settings)` builds the FastAPI app; its lifespan loads the model in a
worker thread, warms it up, starts the engine, and stops it on shutdown."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles

from fastapi.middleware.cors import CORSMiddleware

from .completions import CompletionRequest
from .errors import APIError
from .metrics import Metrics
from .middleware import APIKeyMiddleware, BodyLimitMiddleware
from .protocol import ChatCompletionRequest
from .responses_protocol import ResponsesRequest
from .tokenize import DetokenizeRequest, TokenizeRequest
from .routes import all_routes
from .routes.playground import STATIC_DIR
from .settings import Settings
from .state import AppState

log = logging.getLogger("slime.server")


def build_service(settings: Settings, metrics: Metrics):
    """Load the model and start the engine, in this process or in its own (blocking; runs in a
    worker thread). -> (ChatService, EngineClient)"""
    from model.pillow_bicubic import warm_up as warm_up_bicubic

    from .chat import ChatService
    from .engine.factory import start_engine

    warm_up_bicubic()  # image preprocessing runs here, in the API process: compile before serving
    engine = start_engine(settings.engine_config(), metrics.observe_engine)
    return ChatService(settings, engine, metrics), engine


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _lifespan(state: AppState, service_factory):
    """Load the model in the background (/ready says when), stop the engine at shutdown."""
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async def load():
            try:
                state.chat, state.engine = await asyncio.to_thread(service_factory, state.settings, state.metrics)
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

    return lifespan


def _error_handlers(app: FastAPI, count_error) -> None:
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


def create_app(settings: Settings | None = None, *, service_factory=build_service) -> FastAPI:
    settings = settings or Settings()
    state = AppState(settings)
    app = FastAPI(title="SliME Serve", version="0.1.0", lifespan=_lifespan(state, service_factory))
    app.state.slime = state

    def count_error(err: APIError) -> None:
        state.metrics.error(err)

    _error_handlers(app, count_error)
    app.openapi = _openapi(app, settings.model_id)  # type: ignore[method-assign]

    # Pure ASGI middleware; the last added is the outermost.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes, on_error=count_error)
    protected = ("/v1/", "/tokenize", "/detokenize") + (("/metrics",) if settings.protect_metrics else ())
    app.add_middleware(APIKeyMiddleware, keys=settings.api_key, protected=protected, on_error=count_error)
    if settings.cors_origins:
        wildcard = "*" in settings.cors_origins
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], allow_credentials=not wildcard)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    for router in all_routes():
        app.include_router(router)
    return app


def _openapi(app: FastAPI, model_name: str):
    def build() -> dict:
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (ChatCompletionRequest, ResponsesRequest, CompletionRequest, TokenizeRequest, DetokenizeRequest):
                body = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(body.pop("$defs", {}))
                if "model" in body.get("required", []):
                    body["properties"]["model"]["enum"] = [model_name]
                components[model.__name__] = body
            app.openapi_schema = schema
        return app.openapi_schema

    return build


