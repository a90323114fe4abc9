"""Starting an engine: in this process, or in one of its own (`engine_process`)."""

from __future__ import annotations

from .build import EngineConfig, build_engine
from .client import StatsObserver
from .interface import EngineClient
from .process import ProcessEngineClient


def start_engine(config: EngineConfig, on_stats: StatsObserver | None = None) -> EngineClient:
    """Load and start the engine (blocking: run it in a worker thread), in this process or, with
    `engine_process`, in its own; either way the result is an `EngineClient` with `info` set."""
    if config.engine_process:
        return ProcessEngineClient(config, on_stats)
    engine = build_engine(config, on_stats)
    engine.start()
    return engine
