"""HTTP routes, one module per resource; each reaches the app's state through `deps`."""

from fastapi import APIRouter

from . import chat, completions, health, metrics, models, playground, responses, tokenize


def all_routes() -> list[APIRouter]:
    return [playground.router, health.router, metrics.router, models.router, chat.router, responses.router,
            tokenize.router, completions.router]
