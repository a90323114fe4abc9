"""Running the app under uvicorn with a graceful SIGTERM: stop admitting (503), let running
requests finish within the drain timeout, then stop the engine and exit 0."""

from __future__ import annotations

import signal

import uvicorn

from .app import create_app
from .settings import Settings


class _DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state) -> None:
        super().__init__(config)
        self.slime_state = state

    def handle_exit(self, sig, frame) -> None:
        # New requests get 503 from now on; uvicorn waits for open ones (timeout_graceful_shutdown).
        self.slime_state.shutting_down = True
        self.slime_state.ready = False
        super().handle_exit(sig, frame)
        # uvicorn re-raises captured signals after shutdown; a completed drain exits 0 instead.
        if sig == signal.SIGTERM and sig in self._captured_signals:
            self._captured_signals.remove(sig)


def serve(settings: Settings) -> None:
    # --drain-timeout 0 cancels running requests at once (uvicorn waits forever only on None).
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=int(settings.port), log_level=settings.log_level.lower(),
                            access_log=False, timeout_graceful_shutdown=settings.drain_timeout,  # type: ignore[arg-type]
                            log_config=None)
    _DrainingServer(config, app.state.slime).run()
