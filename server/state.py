"""What the routes share: the settings, the metrics and, once loaded, the chat service and the
engine. Its own module so that the routes and the app that mounts them do not import each other."""

from __future__ import annotations

from .metrics import Metrics
from .settings import Settings


class AppState:
    """Everything the routes need, typed (no ad-hoc app.state lookups)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.metrics = Metrics(settings.model_id)
        self.chat = None  # ChatService once loaded
        self.engine = None
        self.ready = False
        self.load_error: str | None = None
        self.shutting_down = False
