"""Chat service: serving a chat request -- admission, preparation in a worker thread
(`prepare.RequestPreparer`), submission to the engine, and the answer as one response or as SSE
chunks. The engine does the tensor work; the event loop only moves bytes."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, AsyncIterator, Iterator

from .engine.interface import EngineClient, EngineDead
from .engine.types import EngineRequest, ErrorKind, Event
from .errors import APIError, engine_error
from .fetch import ImageFetcher
from .prepare import Prepared, RequestPreparer, fetch_policy
from .structured import single_forced_tool, tool_call
from .protocol import (AssistantMessage, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, ChoiceLogprobs,
                       Choice, ChunkChoice, Delta, FunctionCallDelta, ImageSelection, SliMEReport, TokenLogprobOut,
                       ToolCallDelta, ToolCallOut, TopLogprob, Usage, dump)
from .settings import Settings

if TYPE_CHECKING:
    from .metrics import Metrics


async def merged_events(streams: list) -> AsyncIterator[tuple[int, Event]]:
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


class ChatService:
    def __init__(self, settings: Settings, engine: EngineClient, metrics: Metrics | None = None):
        self.settings = settings
        self.engine = engine
        self.tokenizer = engine.info.tokenizer
        self.metrics = metrics
        self.model_name = settings.model_id
        self.preparer = RequestPreparer(settings, engine.info, engine.cached_image, metrics)
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="slime-prep")
        policy = fetch_policy(settings)
        self.fetcher = ImageFetcher(policy, workers=settings.image_url_workers) if policy is not None else None
        self.preparing = 0  # requests between admission and submission to the engine

    async def start(self, req: ChatCompletionRequest) -> tuple[str, list[AsyncIterator[Event]]]:
        """Validate, prepare off the loop, and submit one engine request per choice."""
        s = self.settings
        req.check_supported(max_n=s.max_n, max_stop=s.max_stop)
        self.check_model(req.model)
        with self.admitted(req.n):
            prepared = await self._prepare(req)
            params = self.preparer.sampling_params(req, prepared)
        cid = "chatcmpl-" + uuid.uuid4().hex
        return cid, await self.submit(self.preparer.engine_requests(req, cid, prepared, params))

    def check_model(self, model: str) -> None:
        if model != self.model_name:
            raise APIError(404, f"The model '{model}' does not exist; this server serves '{self.model_name}'",
                           param="model", code="model_not_found")

    @contextmanager
    def admitted(self, n: int) -> Iterator[None]:
        """Bounded admission: everything preparing, waiting or running counts (429 past it)."""
        s = self.settings
        if self.preparing + self.engine.num_requests + n > s.max_waiting_requests + s.max_batch_size:
            raise APIError(429, "the server is overloaded; retry later", type="rate_limit_error",
                           code="overloaded", headers={"Retry-After": "1"})
        self.preparing += n
        try:
            yield
        finally:
            self.preparing -= n

    async def submit(self, requests: list[EngineRequest]) -> list[AsyncIterator[Event]]:
        streams = []
        for er in requests:
            try:
                streams.append(self.engine.submit(er))
            except EngineDead:
                for st in streams:
                    await st.aclose()
                raise APIError(503, "the engine is not running", type="unavailable", code="engine_dead") from None
        return streams

    async def _prepare(self, req: ChatCompletionRequest) -> Prepared:
        """Checks here; image URLs fetched on the fetcher's pool (all at once, one deadline); then
        decoding, slicing and tokenising on a preparation worker."""
        messages, urls = self.preparer.messages(req)
        fetched = await self.fetch_images(urls)
        return await asyncio.get_running_loop().run_in_executor(self.pool, self.preparer.prepare, req, messages,
                                                                urls, fetched)

    async def fetch_images(self, urls: list[tuple[str, str]]) -> dict[str, bytes]:
        """The bodies of the http(s) image URLs among `urls` ((url, param) pairs), by param."""
        remote = self.preparer.remote_urls(urls) if self.fetcher is not None else []
        bodies = await self.fetcher.fetch_all(remote) if remote else []
        return {param: body for (_, param), body in zip(remote, bodies)}

    # -- responses -------------------------------------------------------------------------------
    def _logprobs(self, event: Event) -> list[TokenLogprobOut]:
        tok = self.tokenizer
        out = []
        for lp in event.logprobs:
            t = tok.convert_ids_to_tokens(lp.token_id)
            tops = [(tok.convert_ids_to_tokens(i), v) for i, v in lp.top]
            out.append(TokenLogprobOut(token=t, logprob=lp.logprob, bytes=list(t.encode("utf-8")),
                                       top_logprobs=[TopLogprob(token=s, logprob=v, bytes=list(s.encode("utf-8")))
                                                     for s, v in tops]))
        return out

    @staticmethod
    def _raise_for(event: Event) -> None:
        if event.error is not None:
            raise engine_error(event.error)

    async def complete(self, req: ChatCompletionRequest) -> ChatCompletion:
        cid, streams = await self.start(req)
        created = int(time.time())

        async def collect(i: int, stream) -> tuple[Choice, int, int, Any]:
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
            answer = "".join(text)
            message = AssistantMessage(role="assistant", content=answer)
            if req.calls_tool and (finish == "stop" or single_forced_tool(req)):
                # a complete call; or, cut by max_tokens, one function's partial arguments (as streamed)
                message = AssistantMessage(role="assistant", content=None,
                                           tool_calls=[ToolCallOut(**tool_call(req, answer))])
                finish = "tool_calls" if finish == "stop" else finish
            choice = Choice(index=i, message=message, logprobs=ChoiceLogprobs(content=lps) if req.logprobs else None,
                            finish_reason=finish)
            return choice, prompt, completion, images

        tasks = [asyncio.create_task(collect(i, s)) for i, s in enumerate(streams)]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            failed = [t for t in tasks if t.done() and t.exception() is not None]
            if failed:  # one choice failed: the request did; the others stop (their requests abort)
                raise failed[0].exception()  # type: ignore[misc]
            results = [t.result() for t in tasks]
        finally:
            for t in tasks:
                t.cancel()
            for s in streams:
                await s.aclose()
            await asyncio.gather(*tasks, return_exceptions=True)
        prompt = results[0][1]
        completion = sum(r[2] for r in results)
        body = ChatCompletion(id=cid, object="chat.completion", created=created, model=self.model_name,
                              choices=[r[0] for r in results],
                              usage=Usage(prompt_tokens=prompt, completion_tokens=completion,
                                          total_tokens=prompt + completion))
        if req.slime_selection:
            body.slime = _selection(results[0][3])
        return body

    async def stream(self, req: ChatCompletionRequest) -> AsyncIterator[str]:
        """Validate and submit first (errors become HTTP errors), then return the SSE body."""
        cid, streams = await self.start(req)
        return self._sse(req, cid, streams)

    async def _sse(self, req: ChatCompletionRequest, cid: str, streams: list) -> AsyncIterator[str]:
        sse = _ChatStream(req, cid, self.model_name, self._logprobs)
        events = merged_events(streams)
        try:
            async for i, ev in events:
                if ev.error is not None:
                    err = engine_error(ev.error)
                    if self.metrics:  # the status line went out long ago: count it here
                        self.metrics.error(err)
                    yield "data: " + json.dumps(err.body()) + "\n\n"
                    yield "data: [DONE]\n\n"
                    return
                chunk = sse.token(i, ev)
                if chunk:
                    yield chunk
                if ev.finish_reason:
                    yield sse.final(i, ev)
            if sse.out.include_usage:
                yield sse.usage()
            yield "data: [DONE]\n\n"
        finally:
            await events.aclose()  # closing an engine stream early aborts its request
            for s in streams:
                await s.aclose()


class _ChatStream:
    """The chunks of one streamed chat completion, by event kind: a token's (text, tool-call
    arguments or logprobs), a choice's last, and the usage."""

    def __init__(self, req: ChatCompletionRequest, cid: str, model: str, logprobs):
        opts = req.stream_options
        self.req, self.logprobs = req, logprobs
        self.out = ChunkWriter(cid, int(time.time()), model, include_usage=bool(opts and opts.include_usage),
                               continuous_usage=bool(opts and opts.include_usage and opts.continuous_usage_stats))
        self.calls = _ToolCallStreams(req) if req.calls_tool else None
        # Each choice's role goes with its first token (clients time the first token at the first
        # data chunk: a role-only chunk at acceptance made their TTFT look like our queueing time).
        self.started: set[int] = set()
        self.prompt = self.completion = 0
        self.images = None

    def _opening(self, i: int, delta: Delta) -> Delta:
        if i not in self.started:
            self.started.add(i)
            delta.role = "assistant"
        return delta

    def _chunk(self, i: int, delta: Delta, logprobs=None) -> str:
        return self.out.chunk([ChunkChoice(index=i, delta=self._opening(i, delta), logprobs=logprobs,
                                           finish_reason=None)])

    def token(self, i: int, ev) -> str | None:
        self.prompt = ev.prompt_tokens or self.prompt
        self.images = ev.images or self.images
        self.out.count(i, ev)
        if self.calls is not None:
            delta = self.calls.delta(i, ev.text, ev.finish_reason)
            return None if delta is None else self._chunk(i, delta)
        if self.req.logprobs:
            return self._chunk(i, Delta(content=ev.text), ChoiceLogprobs(content=self.logprobs(ev)))
        if not ev.text:
            return None
        return self.out.content(i, ev.text) if i in self.started else self._chunk(i, Delta(content=ev.text))

    def final(self, i: int, ev) -> str:
        self.completion += ev.completion_tokens
        finish = "tool_calls" if self.calls is not None and ev.finish_reason == "stop" else ev.finish_reason
        # an answer with no text at all still names its role, in its last chunk
        delta = Delta() if i in self.started else self._opening(i, Delta(content=None if self.calls else ""))
        slime = _selection(self.images) if self.req.slime_selection and i == 0 else None
        return self.out.chunk([ChunkChoice(index=i, delta=delta, logprobs=None, finish_reason=finish)], slime=slime)

    def usage(self) -> str:
        return self.out.chunk([], Usage(prompt_tokens=self.prompt, completion_tokens=self.completion,
                                        total_tokens=self.prompt + self.completion))


def _selection(images) -> SliMEReport:
    """model.modeling.ImageReport -> the `slime_selection` extension's report."""
    return SliMEReport(images=[ImageSelection(
        grid=list(r.grid) if r.grid else None, views=r.views, global_tokens=r.global_tokens,
        local_tokens=r.local_tokens, local_kept=r.local_kept,
        **({"kept_mask": "".join("1" if k else "0" for k in r.kept_mask)} if r.kept_mask is not None else {}))
        for r in (images or [])])


class ChunkWriter:
    """The SSE chunks of one streamed response: from the typed models, except the per-token
    content chunk (the hot path), which is built by hand with only the text serialised per token
    (tested to equal the model's serialisation)."""

    def __init__(self, cid: str, created: int, model: str, *, include_usage: bool, continuous_usage: bool = False):
        self.cid, self.created, self.model = cid, created, model
        self.include_usage = include_usage
        self.continuous_usage = continuous_usage  # vLLM's continuous_usage_stats: usage so far in every chunk
        self._prompt = 0
        self._completion: dict[int, int] = {}  # per choice
        base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}
        self._head = json.dumps(base, ensure_ascii=False)[:-1]
        self._tail = ', "usage": null}\n\n' if include_usage else "}\n\n"

    def count(self, i: int, event: Event) -> None:
        self._prompt = event.prompt_tokens or self._prompt
        if event.completion_tokens:
            self._completion[i] = event.completion_tokens

    def _usage_so_far(self) -> Usage:
        completion = sum(self._completion.values())
        return Usage(prompt_tokens=self._prompt, completion_tokens=completion, total_tokens=self._prompt + completion)

    def chunk(self, choices: list[ChunkChoice], usage: Usage | None = None, slime: SliMEReport | None = None) -> str:
        if usage is None and self.continuous_usage:
            usage = self._usage_so_far()
        extra: dict[str, Any] = {"usage": usage} if self.include_usage else {}
        if slime is not None:
            extra["slime"] = slime
        body = ChatCompletionChunk(id=self.cid, object="chat.completion.chunk", created=self.created,
                                   model=self.model, choices=choices, **extra)
        return "data: " + dump(body) + "\n\n"

    def content(self, i: int, text: str) -> str:
        tail = self._tail if not self.continuous_usage else f', "usage": {self._usage_so_far().model_dump_json()}}}\n\n'
        return (f'data: {self._head}, "choices": [{{"index": {i}, "delta": {{"content": '
                f'{json.dumps(text, ensure_ascii=False)}}}, "logprobs": null, "finish_reason": null}}]{tail}')


class _ToolCallStreams:
    """Streamed tool calls, per choice: a single named function's arguments stream as they come
    (the first delta carries the call's id and name); a call to one of several functions is
    parsed when complete and sent in one delta."""

    def __init__(self, req: ChatCompletionRequest):
        self.req = req
        self.name = single_forced_tool(req)
        self.text: dict[int, list[str]] = {}

    def delta(self, i: int, text: str, finish: str | None) -> Delta | None:
        first = i not in self.text
        self.text.setdefault(i, []).append(text)
        if self.name is not None:
            if first:
                call = ToolCallDelta(index=0, id="call_" + uuid.uuid4().hex[:24], type="function",
                                     function=FunctionCallDelta(name=self.name, arguments=text))
            elif text:
                call = ToolCallDelta(index=0, function=FunctionCallDelta(arguments=text))
            else:
                return None
            return Delta(tool_calls=[call])
        if finish is None:
            return None
        answer = "".join(self.text[i])
        if finish != "stop":  # incomplete: what there is, as text
            return Delta(content=answer)
        call = tool_call(self.req, answer)
        return Delta(tool_calls=[ToolCallDelta(index=0, id=call["id"], type="function",
                                               function=FunctionCallDelta(**call["function"]))])

