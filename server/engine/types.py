"""Data crossing the engine boundary (dataclasses, no torch)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from model.sampling import SamplingParams, TokenLogprob


@dataclass
class EngineRequest:
    request_id: str
    input_ids: list[int]  # prompt with -200 image placeholders
    images: list[Any]  # model.processor.PreparedImage, in placeholder order
    params: SamplingParams
    max_prompt_tokens: int  # upper bound (image rows before selection), checked at admission
    with_selection: bool = False  # report per-image kept masks (playground extension)
    arrival: float = field(default_factory=time.monotonic)
    features: list[Any] | None = None  # model.modeling.ImageFeatures, set by the vision stage
    vision_seconds: float = 0.0


@dataclass
class Event:
    """What one engine step produced for one request."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None  # stop | length | abort | error
    prompt_tokens: int = 0
    completion_tokens: int = 0
    images: list[Any] | None = None  # model.modeling.ImageReport, once, with the first tokens
    error: str | None = None
    error_type: str = "server_error"
    error_status: int = 500
