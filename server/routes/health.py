"""Liveness and readiness."""

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from .deps import StateDep

router = APIRouter()


@router.get("/health")
async def health(state: StateDep):
    # Liveness: fails only when restarting is the cure (the model failed to load, or the engine
    # died after starting); loading and draining are still alive.
    if state.load_error or (state.engine is not None and not state.engine.alive and not state.shutting_down):
        return JSONResponse({"status": "dead", "detail": state.load_error or "engine loop stopped"}, status_code=503)
    return {"status": "ok"}


@router.get("/ready")
async def ready(state: StateDep):
    if state.ready and state.engine is not None and state.engine.alive:
        return {"status": "ready"}
    detail = state.load_error or ("shutting down" if state.shutting_down else "loading")
    return JSONResponse({"status": "not ready", "detail": detail}, status_code=503)
