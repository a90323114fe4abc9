"""Data crossing the engine boundary: plain dataclasses and enums, no torch, no HTTP.

The chat layer builds `EngineRequest`s and reads `Event`s; the engine reports `EngineStats`
once per step, which the API process turns into Prometheus metrics (`server.metrics`)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from model.sampling_params import SamplingParams, TokenLogprob

if TYPE_CHECKING:  # for annotations only: the API process imports no torch
    from transformers import PreTrainedTokenizerBase

    from model.config import SliMEConfig
    from model.loading import LoadedModel
    from model.modeling import ImageFeatures, ImageReport
    from model.processor import PreparedImage
    from model.slicing import ImageNorm

__all__ = ["CachedImage", "EngineError", "EngineRequest", "EngineStats", "ErrorKind", "Event", "FinishedRequest",
           "ModelInfo", "SamplingParams", "TokenLogprob"]


@dataclass
class EngineRequest:
    request_id: str
    input_ids: list[int]  # prompt with -200 image placeholders
    images: list[PreparedImage]  # in placeholder order
    params: SamplingParams
    max_prompt_tokens: int  # upper bound (image rows before selection), checked at admission
    slime_selection: bool = False  # report each image's kept-token mask (playground extension)
    # The choices of one n>1 request share a group: the first to complete its prompt lends its KV
    # blocks and its last logits to the others waiting (copy on write), which compute no prompt.
    group: str | None = None
    arrival: float = field(default_factory=time.monotonic)
    features: list[ImageFeatures] | None = None  # set by the vision stage
    vision_seconds: float = 0.0


class ErrorKind(enum.Enum):
    """Why a request failed, in engine terms; the API layer decides what a client sees."""

    INVALID_REQUEST = "invalid_request"  # cannot run as asked (e.g. too long once image rows are known)
    MODEL_ERROR = "model_error"  # a model stage failed for this request
    RETRY = "retry"  # transient (cached image features were evicted): the same request may succeed
    UNAVAILABLE = "unavailable"  # the engine is stopping or gone


@dataclass(frozen=True)
class EngineError:
    kind: ErrorKind
    message: str


@dataclass
class Event:
    """What one engine step produced for one request."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None  # stop | length | abort | error
    prompt_tokens: int = 0
    completion_tokens: int = 0
    images: list[ImageReport] | None = None  # once, with the first tokens
    error: EngineError | None = None

    @classmethod
    def failed(cls, kind: ErrorKind, message: str) -> "Event":
        return cls(finish_reason="error", error=EngineError(kind, message))


@dataclass(frozen=True)
class CachedImage:
    """A vision-cache hit, as the chat layer sees it (the features stay in the engine)."""

    grid: tuple[int, int] | None  # its slicing grid (cols, rows); None for single-view images


@dataclass
class ModelInfo:
    """What request preparation needs of the served model, the same in both engine modes (the
    weights stay with the engine)."""

    cfg: SliMEConfig
    template: str
    image_norm: ImageNorm
    accepts_images: bool
    tokenizer: PreTrainedTokenizerBase | None = None

    @classmethod
    def of(cls, lm: LoadedModel) -> "ModelInfo":
        """From a model.loading.LoadedModel (its tokenizer included)."""
        return cls(cfg=lm.cfg, template=lm.template, image_norm=lm.image_norm, accepts_images=lm.accepts_images,
                   tokenizer=lm.tokenizer)


@dataclass
class FinishedRequest:
    status: str  # ok | error | aborted
    finish_reason: str
    prompt_tokens: int
    generation_tokens: int
    e2e_seconds: float | None  # arrival to last token, for those that finished ok


@dataclass
class EngineStats:
    """What the engine did since its last report (vLLM's SchedulerStats pattern): gauges as of
    now, and every observation since, for one observer to turn into metrics."""

    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0  # share of the KV cache's blocks in use
    kv_cached_blocks: int = 0  # blocks a later prompt can reuse (prefix cache)
    kv_blocks: int = 0  # the pool's blocks (usable ones) and positions per block
    kv_block_size: int = 0
    preemptions: int = 0  # sequences preempted this step (blocks ran out)
    prefix_queried_tokens: int = 0  # prompt positions looked up in the prefix cache
    prefix_hit_tokens: int = 0  # of which found there (not computed again)
    cuda_graphs: int = 0
    attention_backend: str = ""  # how the LLM attends now (model.execution; after any warm-up fallback)
    vision_features_bytes: int = 0  # encoded image features held by requests not started yet
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    queue_time: list[float] = field(default_factory=list)
    vision_seconds: list[float] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)
    image_tokens: dict[str, int] = field(default_factory=dict)  # global | local_total | local_kept
    finished: list[FinishedRequest] = field(default_factory=list)
