"""Chat service: OpenAI request -> prompt + images -> engine -> OpenAI responses / SSE chunks.

CPU-heavy preparation (image decoding, slicing, tokenisation) runs in a thread pool, never on the
event loop; the engine does the tensor work.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, AsyncIterator

from model.config import IMAGE_TOKEN_INDEX
from model.processor import PreparedImage, prepare_image, tokenize_prompt
from model.sampling import SamplingParams
from model.templates import Message, build_prompt

from .engine.interface import EngineClient, EngineDead
from .engine.types import EngineRequest, ErrorKind, Event
from .errors import APIError, bad_request, engine_error
from .fetch import FetchPolicy
from .media import image_bytes, open_image
from .protocol import ChatCompletionRequest
from .settings import Settings


@dataclass
class Prepared:
    input_ids: list[int]
    images: list[Any]
    max_prompt_tokens: int


async def _merged(streams: list) -> AsyncIterator[tuple[int, Event]]:
    """(choice index, event) from every engine stream until each has finished. A single stream
    (n=1, the usual case) is iterated directly: no relay task and queue hop per token."""
    if len(streams) == 1:
        try:
            async for ev in streams[0]:
                yield 0, ev
        except Exception as e:  # noqa: BLE001
            yield 0, Event.failed(ErrorKind.MODEL_ERROR, str(e))
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream) -> None:
        try:
            async for ev in stream:
                await queue.put((i, ev))
        except Exception as e:  # noqa: BLE001
            await queue.put((i, Event.failed(ErrorKind.MODEL_ERROR, str(e))))
        finally:
            await stream.aclose()
            await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        done = 0
        while done < len(streams):
            i, ev = await queue.get()
            if ev is None:
                done += 1
                continue
            yield i, ev
    finally:
        # Cancelling a pump cancels its engine stream, whose cleanup aborts the request.
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def image_report(r) -> dict:
    """A model.modeling.ImageReport as the `slime` extension shows it."""
    d = {"grid": list(r.grid) if r.grid else None, "views": r.views, "global_tokens": r.global_tokens,
         "local_tokens": r.local_tokens, "local_kept": r.local_kept}
    if r.kept_mask is not None:
        d["kept_mask"] = "".join("1" if k else "0" for k in r.kept_mask)
    return d


class ChatService:
    def __init__(self, settings: Settings, engine: EngineClient, metrics=None):
        self.settings = settings
        self.lm = engine.info  # what preparation needs of the model (config, template, tokenizer)
        self.engine = engine
        self.metrics = metrics
        self.model_name = settings.model_id
        self.template = engine.info.template if settings.chat_template == "auto" else settings.chat_template
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="slime-prep")
        self.fetch_policy = FetchPolicy(tuple(settings.image_url_domains), settings.image_url_timeout,
                                        settings.max_request_bytes, settings.image_url_max_redirects,
                                        settings.image_url_allow_private) if settings.allow_image_urls else None
        self.preparing = 0  # requests between admission and submission to the engine

    # -- preparation (thread pool) ---------------------------------------------------------------
    def _messages(self, req: ChatCompletionRequest) -> tuple[list[Message], list[tuple[str, str]]]:
        if len(req.messages) > self.settings.max_messages:
            raise bad_request(f"at most {self.settings.max_messages} messages are allowed", param="messages")
        messages: list[Message] = []
        urls: list[tuple[str, str]] = []
        for i, m in enumerate(req.messages):
            role = "system" if m.role == "developer" else m.role
            if m.content is None:
                if role != "assistant":
                    raise bad_request("content is required", param=f"messages[{i}].content")
                messages.append(Message("assistant", ""))
                continue
            if isinstance(m.content, str):
                messages.append(Message(role, m.content))
                continue
            texts, n_img = [], 0
            for j, part in enumerate(m.content):
                if part.type == "text":
                    texts.append(part.text)
                else:
                    if role != "user":
                        raise bad_request("only user messages can carry images", param=f"messages[{i}].content[{j}]")
                    if part.image_url.detail == "low":
                        raise bad_request("detail 'low' is not supported: SliME always slices the image",
                                          param=f"messages[{i}].content[{j}].image_url.detail")
                    urls.append((part.image_url.url, f"messages[{i}].content[{j}].image_url.url"))
                    n_img += 1
            messages.append(Message(role, "\n".join(texts), n_img))
        if len(urls) > self.settings.max_images_per_request:
            raise bad_request(f"at most {self.settings.max_images_per_request} images per request",
                              param="messages", code="too_many_images")
        return messages, urls

    def prepare(self, req: ChatCompletionRequest) -> Prepared:
        messages, urls = self._messages(req)
        t0 = time.perf_counter()
        images = []
        for url, param in urls:
            data = image_bytes(url, param=param, policy=self.fetch_policy)
            digest = hashlib.blake2b(data, digest_size=16).hexdigest()
            cached = self.engine.cached_image(digest)
            if self.metrics and self.settings.vision_cache_mb:
                self.metrics.vision_cache.labels("hit" if cached is not None else "miss").inc()
            if cached is not None:  # seen before: no decoding, slicing or vision encoding
                images.append(PreparedImage(None, cached.grid, digest))
                continue
            img = open_image(data, max_pixels=self.settings.max_image_pixels, param=param)
            images.append(prepare_image(img, self.lm.cfg, digest, norm=self.lm.image_norm))
        if images and self.metrics:
            self.metrics.preprocess.observe(time.perf_counter() - t0)
            self.metrics.images.inc(len(images))
        if images and not self.lm.accepts_images:
            raise bad_request("this model does not accept images", param="messages")
        try:
            pieces = build_prompt(messages, self.template)
        except ValueError as e:
            raise bad_request(str(e), param="messages") from None
        ids = tokenize_prompt(self.lm.tokenizer, pieces)
        bound = sum(1 for t in ids if t != IMAGE_TOKEN_INDEX) + sum(im.max_rows(self.lm.cfg) for im in images)
        return Prepared(ids, images, bound)

    def sampling_params(self, req: ChatCompletionRequest, prompt_bound: int) -> SamplingParams:
        s = self.settings
        max_tokens = req.max_completion_tokens or req.max_tokens
        if max_tokens is not None and max_tokens > s.max_tokens_cap:
            raise bad_request(f"max_tokens must be at most {s.max_tokens_cap}", param="max_tokens")
        room = s.max_model_len - prompt_bound
        if max_tokens is None:
            max_tokens = min(s.default_max_tokens, room)
        if room < 1 or prompt_bound + max_tokens > s.max_model_len:
            raise APIError(400, f"This model's maximum context length is {s.max_model_len} tokens. The prompt "
                                f"needs up to {prompt_bound} (image rows included) and {max_tokens} were asked "
                                f"for the completion.", param="messages", code="context_length_exceeded")
        temperature = 1.0 if req.temperature is None else req.temperature
        return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=req.top_p or 1.0,
                              top_k=req.top_k or 0, seed=req.seed, presence_penalty=req.presence_penalty or 0.0,
                              frequency_penalty=req.frequency_penalty or 0.0,
                              repetition_penalty=req.repetition_penalty or 1.0, stop=req.stop_list,
                              ignore_eos=req.ignore_eos, logprobs=req.logprobs, top_logprobs=req.top_logprobs or 0)

    async def start(self, req: ChatCompletionRequest) -> tuple[str, list[AsyncIterator[Event]]]:
        """Validate, prepare off the loop, and submit one engine request per choice."""
        s = self.settings
        req.check_supported(max_n=s.max_n, max_stop=s.max_stop)
        if req.model != self.model_name:
            raise APIError(404, f"The model '{req.model}' does not exist; this server serves '{self.model_name}'",
                           param="model", code="model_not_found")
        # Bounded admission: everything preparing, waiting or running counts.
        if self.preparing + self.engine.num_requests + req.n > s.max_waiting_requests + s.max_batch_size:
            raise APIError(429, "the server is overloaded; retry later", type="rate_limit_error",
                           code="overloaded", headers={"Retry-After": "1"})
        self.preparing += req.n
        try:
            prepared = await asyncio.get_running_loop().run_in_executor(self.pool, self.prepare, req)
            params = self.sampling_params(req, prepared.max_prompt_tokens)
        finally:
            self.preparing -= req.n
        cid = "chatcmpl-" + uuid.uuid4().hex
        streams = []
        for i in range(req.n):
            p = params if i == 0 else SamplingParams(**{**params.__dict__, "seed": None if params.seed is None
                                                        else params.seed + i})
            er = EngineRequest(f"{cid}-{i}", prepared.input_ids, prepared.images, p, prepared.max_prompt_tokens,
                               slime_selection=req.slime_selection)
            try:
                streams.append(self.engine.submit(er))
            except EngineDead:
                for st in streams:
                    await st.aclose()
                raise APIError(503, "the engine is not running", type="unavailable", code="engine_dead") from None
        return cid, streams

    # -- responses -------------------------------------------------------------------------------
    def _logprobs(self, event: Event) -> list[dict]:
        tok = self.lm.tokenizer
        out = []
        for lp in event.logprobs:
            t = tok.convert_ids_to_tokens(lp.token_id)
            out.append({"token": t, "logprob": lp.logprob, "bytes": list(t.encode("utf-8")),
                        "top_logprobs": [{"token": tok.convert_ids_to_tokens(i), "logprob": v,
                                          "bytes": list(tok.convert_ids_to_tokens(i).encode("utf-8"))}
                                         for i, v in lp.top]})
        return out

    @staticmethod
    def _raise_for(event: Event) -> None:
        if event.error is not None:
            raise engine_error(event.error)

    async def complete(self, req: ChatCompletionRequest) -> dict:
        cid, streams = await self.start(req)
        created = int(time.time())

        async def collect(i: int, stream) -> tuple[dict, int, int, Any]:
            text, lps, finish, prompt, completion, images = [], [], None, 0, 0, None
            try:
                async for ev in stream:
                    self._raise_for(ev)
                    text.append(ev.text)
                    if req.logprobs:
                        lps += self._logprobs(ev)
                    images = ev.images or images
                    finish, prompt, completion = ev.finish_reason, ev.prompt_tokens, ev.completion_tokens
            finally:
                await stream.aclose()
            choice = {"index": i, "message": {"role": "assistant", "content": "".join(text)},
                      "logprobs": {"content": lps} if req.logprobs else None, "finish_reason": finish}
            return choice, prompt, completion, images

        try:
            results = await asyncio.gather(*(collect(i, s) for i, s in enumerate(streams)))
        finally:
            for s in streams:
                await s.aclose()
        prompt = results[0][1]
        completion = sum(r[2] for r in results)
        body = {"id": cid, "object": "chat.completion", "created": created, "model": self.model_name,
                "choices": [r[0] for r in results],
                "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                          "total_tokens": prompt + completion}}
        if req.slime_selection:
            body["slime"] = self._selection(results[0][3])
        return body

    @staticmethod
    def _selection(images) -> dict:
        return {"images": [image_report(r) for r in (images or [])]}

    async def stream(self, req: ChatCompletionRequest) -> AsyncIterator[str]:
        """Validate and submit first (errors become HTTP errors), then return the SSE body."""
        cid, streams = await self.start(req)
        return self._sse(req, cid, streams)

    async def _sse(self, req: ChatCompletionRequest, cid: str, streams: list) -> AsyncIterator[str]:
        created = int(time.time())
        base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": self.model_name}
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(choices: list[dict], usage: Any = None) -> str:
            body = {**base, "choices": choices}
            if include_usage:
                body["usage"] = usage
            return "data: " + json.dumps(body, ensure_ascii=False) + "\n\n"

        # The per-token chunk is the hot path: only the text is serialised per token.
        head = json.dumps(base, ensure_ascii=False)[:-1]
        tail = ', "usage": null}\n\n' if include_usage else "}\n\n"

        def content_chunk(i: int, text: str) -> str:
            return (f'data: {head}, "choices": [{{"index": {i}, "delta": {{"content": '
                    f'{json.dumps(text, ensure_ascii=False)}}}, "logprobs": null, "finish_reason": null}}]{tail}')

        events = _merged(streams)
        try:
            for i in range(len(streams)):
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])
            prompt, completion, images = 0, 0, None
            async for i, ev in events:
                if ev.error is not None:
                    err = engine_error(ev.error)
                    if self.metrics:  # the status line went out long ago: count it here
                        self.metrics.errors.labels(err.type, str(err.status)).inc()
                    yield "data: " + json.dumps(err.body()) + "\n\n"
                    yield "data: [DONE]\n\n"
                    return
                prompt = ev.prompt_tokens or prompt
                images = ev.images or images
                if req.logprobs:
                    lp = {"content": self._logprobs(ev)}
                    yield chunk([{"index": i, "delta": {"content": ev.text}, "logprobs": lp, "finish_reason": None}])
                elif ev.text:
                    yield content_chunk(i, ev.text)
                if ev.finish_reason:
                    completion += ev.completion_tokens
                    final = {"index": i, "delta": {}, "logprobs": None, "finish_reason": ev.finish_reason}
                    if req.slime_selection and i == 0:
                        body = {**base, "choices": [final], "slime": self._selection(images)}
                        if include_usage:
                            body["usage"] = None
                        yield "data: " + json.dumps(body) + "\n\n"
                    else:
                        yield chunk([final])
            if include_usage:
                yield chunk([], {"prompt_tokens": prompt, "completion_tokens": completion,
                                 "total_tokens": prompt + completion})
            yield "data: [DONE]\n\n"
        finally:
            await events.aclose()  # closing an engine stream early aborts its request
            for s in streams:
                await s.aclose()
