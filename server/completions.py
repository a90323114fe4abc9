"""POST /v1/completions (the legacy text API, which gateways' model-server protocol and load tools
call): a text prompt, or token ids, continued by the LLM; no images and no chat template. The same
admission, sampling checks and engine as chat; streamed as `text_completion` chunks."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import replace
from typing import TYPE_CHECKING, Any, AsyncIterator, Union

from pydantic import ConfigDict, Field, field_validator, model_validator

from model.sampling_params import SamplingParams

from .engine.types import EngineRequest, Event
from .errors import bad_request, engine_error
from .protocol import (GREEDY_BELOW, REPETITION_PENALTY_FLOOR, SEED_MAX, SEED_MIN, TOP_P_FLOOR, GatewayExtensions,
                       StreamOptions, check_unicode, sampling_fields)

if TYPE_CHECKING:
    from .chat import ChatService

# Fields of OpenAI's completions API that this server does not implement: a 400 names them.
UNSUPPORTED_COMPLETION_FIELDS = ("suffix", "logit_bias", "best_of")


class CompletionRequest(GatewayExtensions):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    prompt: Union[str, list[int]]  # text, or token ids
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for this API
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: Union[str, list[str], None] = None
    n: int = Field(1, ge=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    logprobs: int | None = Field(None, ge=0, le=20)  # the top-k alternatives per token (the legacy shape)
    echo: bool = False
    user: str | None = None
    ignore_eos: bool = False
    suffix: Any = None
    logit_bias: Any = None
    best_of: Any = None

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        check_unicode(data)
        return data

    @field_validator("temperature")
    @classmethod
    def _tiny_temperature_is_greedy(cls, v: float | None) -> float | None:
        return 0.0 if v is not None and v < GREEDY_BELOW else v

    @field_validator("top_p")
    @classmethod
    def _top_p_floor(cls, v: float | None) -> float | None:
        return None if v is None else max(v, TOP_P_FLOOR)

    @field_validator("repetition_penalty")
    @classmethod
    def _repetition_penalty_floor(cls, v: float | None) -> float | None:
        return None if v is None else max(v, REPETITION_PENALTY_FLOOR)

    @property
    def stop_list(self) -> list[str]:
        return [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def to_sampling_params(self, max_tokens: int) -> SamplingParams:
        """The engine's sampling parameters (legacy `logprobs`: how many alternatives per token)."""
        return SamplingParams(max_tokens=max_tokens, logprobs=self.logprobs is not None,
                              top_logprobs=self.logprobs or 0, **sampling_fields(self))

    def check_supported(self, *, max_n: int, max_stop: int, vocab: int) -> None:
        for name in UNSUPPORTED_COMPLETION_FIELDS:
            if getattr(self, name) is not None:
                raise bad_request(f"'{name}' is not supported by this server", param=name,
                                  code="unsupported_parameter")
        if self.echo:
            raise bad_request("echo is not supported by this server", param="echo", code="unsupported_parameter")
        self.check_gateway_extensions()
        if isinstance(self.prompt, str) and not self.prompt:
            raise bad_request("prompt must not be empty", param="prompt")
        if isinstance(self.prompt, list):
            if not self.prompt:
                raise bad_request("prompt must not be empty", param="prompt")
            bad = next((i for i, t in enumerate(self.prompt) if not 0 <= t < vocab), None)
            if bad is not None:
                raise bad_request(f"token id {self.prompt[bad]} is not in the vocabulary (0..{vocab - 1})",
                                  param=f"prompt.{bad}")
        if self.n > max_n:
            raise bad_request(f"n must be at most {max_n}", param="n")
        if len(self.stop_list) > max_stop:
            raise bad_request(f"at most {max_stop} stop sequences are allowed", param="stop")
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed with stream: true", param="stream_options")


class CompletionService:
    def __init__(self, chat: "ChatService"):
        self.chat = chat
        self.tokenizer = chat.tokenizer

    async def _start(self, req: CompletionRequest) -> tuple[str, list[AsyncIterator[Event]]]:
        chat, s = self.chat, self.chat.settings
        req.check_supported(max_n=s.max_n, max_stop=s.max_stop, vocab=len(self.tokenizer))
        chat.check_model(req.model)
        with chat.admitted(req.n):
            ids = req.prompt if isinstance(req.prompt, list) else await asyncio.to_thread(
                lambda: self.tokenizer(req.prompt).input_ids)
            max_tokens = chat.preparer.token_budget(req.max_tokens, len(ids), prompt_param="prompt")
        params = req.to_sampling_params(max_tokens)
        cid = "cmpl-" + uuid.uuid4().hex
        requests = [EngineRequest(f"{cid}-{i}", list(ids), [],
                                  params if i == 0 or params.seed is None else replace(params, seed=params.seed + i),
                                  len(ids), group=cid if req.n > 1 else None) for i in range(req.n)]
        return cid, await chat.submit(requests)

    def _logprobs(self, events: list[Event], offset: int) -> dict[str, Any]:
        tok = self.tokenizer
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for ev in events:
            for lp in ev.logprobs:
                out["tokens"].append(tok.convert_ids_to_tokens(lp.token_id))
                out["token_logprobs"].append(lp.logprob)
                out["top_logprobs"].append({tok.convert_ids_to_tokens(i): v for i, v in lp.top})
                out["text_offset"].append(offset)
            offset += len(ev.text)
        return out

    async def create(self, req: CompletionRequest) -> dict[str, Any]:
        from .chat import merged_events

        cid, streams = await self._start(req)
        created = int(time.time())
        texts: dict[int, list[str]] = {i: [] for i in range(req.n)}
        events: dict[int, list[Event]] = {i: [] for i in range(req.n)}
        finish: dict[int, str | None] = {}
        prompt, completion = 0, 0
        merged = merged_events(streams)
        try:
            async for i, ev in merged:
                if ev.error is not None:
                    raise engine_error(ev.error)
                texts[i].append(ev.text)
                events[i].append(ev)
                prompt = ev.prompt_tokens or prompt
                if ev.finish_reason:
                    finish[i] = ev.finish_reason
                    completion += ev.completion_tokens
        finally:
            await merged.aclose()
            for st in streams:
                await st.aclose()
        choices = [{"index": i, "text": "".join(texts[i]),
                    "logprobs": self._logprobs(events[i], 0) if req.logprobs is not None else None,
                    "finish_reason": finish.get(i)} for i in range(req.n)]
        return {"id": cid, "object": "text_completion", "created": created, "model": self.chat.model_name,
                "choices": choices, "usage": _usage(prompt, completion)}

    async def stream(self, req: CompletionRequest) -> AsyncIterator[str]:
        cid, streams = await self._start(req)
        return self._sse(req, cid, streams)

    async def _sse(self, req: CompletionRequest, cid: str, streams: list) -> AsyncIterator[str]:
        from .chat import merged_events

        head = {"id": cid, "object": "text_completion", "created": int(time.time()), "model": self.chat.model_name}
        opts = req.stream_options
        include_usage = bool(opts and opts.include_usage)
        continuous = include_usage and bool(opts and opts.continuous_usage_stats)
        offsets: dict[int, int] = {}
        counts: dict[int, int] = {}
        prompt = 0
        merged = merged_events(streams)

        def chunk(choices: list, usage: dict | None = None) -> str:
            body = {**head, "choices": choices, **({"usage": usage} if include_usage else {})}
            return "data: " + json.dumps(body, ensure_ascii=False) + "\n\n"

        try:
            async for i, ev in merged:
                if ev.error is not None:
                    err = engine_error(ev.error)
                    if self.chat.metrics:  # the status line went out long ago: count it here
                        self.chat.metrics.error(err)
                    yield "data: " + json.dumps(err.body()) + "\n\n"
                    break
                prompt = ev.prompt_tokens or prompt
                counts[i] = ev.completion_tokens or counts.get(i, 0)
                if not ev.text and not ev.finish_reason:
                    continue  # no chunk without text: the first one carries the first token
                lps = self._logprobs([ev], offsets.get(i, 0)) if req.logprobs is not None else None
                offsets[i] = offsets.get(i, 0) + len(ev.text)
                usage = _usage(prompt, sum(counts.values())) if continuous else None
                yield chunk([{"index": i, "text": ev.text, "logprobs": lps, "finish_reason": ev.finish_reason}], usage)
            else:
                if include_usage:
                    yield chunk([], _usage(prompt, sum(counts.values())))
            yield "data: [DONE]\n\n"
        finally:
            await merged.aclose()
            for st in streams:
                await st.aclose()


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
