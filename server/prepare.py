"""Request preparation: an OpenAI chat request -> prompt token ids, prepared images and sampling
parameters, i.e. the engine requests to submit. `messages` (the template's turns, the image URLs and
the server's limits on both; each message was checked against its role by `ChatMessage`) runs
anywhere; `prepare` runs in a worker thread (image decoding, slicing and tokenising are CPU work
that must stay off the event loop) once the request's image URLs were fetched
(`fetch.ImageFetcher`: network waits never hold a preparation worker)."""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable

from model.config import IMAGE_TOKEN_INDEX
from model.grammar import GrammarError
from model.processor import PreparedImage, prepare_image, tokenize_prompt
from model.slicing import choose_grid
from model.sampling import SamplingParams
from model.templates import Message, build_prompt

from .engine.types import CachedImage, EngineRequest, ModelInfo
from .errors import APIError, bad_request
from .fetch import FetchPolicy
from .media import image_bytes, is_remote, open_image
from .protocol import ChatCompletionRequest
from .settings import Settings
from .structured import grammar_for, tool_call_turn, tool_result_turn, tools_prompt

if TYPE_CHECKING:
    from .metrics import Metrics


@dataclass
class Prepared:
    input_ids: list[int]
    images: list[PreparedImage]
    max_prompt_tokens: int  # image rows counted before selection: an upper bound
    grammar: tuple[str, str] | None = None  # the request's structured-output grammar, compiled (cached)


class RequestPreparer:
    def __init__(self, settings: Settings, info: ModelInfo, cached_image: Callable[[str], CachedImage | None],
                 metrics: Metrics | None = None):
        self.settings = settings
        self.info = info
        self.cached_image = cached_image  # the engine's vision-cache lookup (pins a hit)
        self.metrics = metrics
        self._grammars = None  # model.grammar.GrammarCompiler (the engine's, in one process), at first use
        self._grammars_lock = threading.Lock()
        self.template = info.template if settings.chat_template == "auto" else settings.chat_template

    def messages(self, req: ChatCompletionRequest) -> tuple[list[Message], list[tuple[str, str]]]:
        if len(req.messages) > self.settings.max_messages:
            raise bad_request(f"at most {self.settings.max_messages} messages are allowed", param="messages")
        messages: list[Message] = []
        urls: list[tuple[str, str]] = []
        note = tools_prompt(req)
        if note is not None:
            messages.append(Message("system", note))
        for i, m in enumerate(req.messages):  # each fits its role (ChatMessage's validator)
            role = "system" if m.role == "developer" else m.role
            if m.content is None:  # an assistant turn that only called tools
                messages.append(Message("assistant", tool_call_turn(m) if m.tool_calls else ""))
                continue
            if role == "tool":  # a function's result: the model reads it in a user turn
                text = m.content if isinstance(m.content, str) else "\n".join(
                    p.text for p in m.content if p.type == "text")
                messages.append(Message("user", tool_result_turn(m, text)))
                continue
            if isinstance(m.content, str):
                messages.append(Message(role, m.content + ("\n" + tool_call_turn(m) if m.tool_calls else "")))
                continue
            texts = [p.text for p in m.content if p.type == "text"]
            images = [(j, p) for j, p in enumerate(m.content) if p.type == "image_url"]
            urls += [(p.image_url.url, f"messages[{i}].content[{j}].image_url.url") for j, p in images]
            if m.tool_calls:
                texts.append(tool_call_turn(m))
            messages.append(Message(role, "\n".join(texts), len(images)))
        if len(urls) > self.settings.max_images_per_request:
            raise bad_request(f"at most {self.settings.max_images_per_request} images per request",
                              param="messages", code="too_many_images")
        return messages, urls

    def prepare(self, req: ChatCompletionRequest, messages: list[Message], urls: list[tuple[str, str]],
                fetched: dict[str, bytes]) -> Prepared:
        """`messages` and `urls` from `messages(req)`; `fetched`: the bodies of its http(s) image
        URLs by param (none fetched: URLs are disabled)."""
        t0 = time.perf_counter()
        images = []
        for url, param in urls:
            data = self._image_data(url, param, fetched)
            digest = hashlib.blake2b(data, digest_size=16).hexdigest()
            cached = self.cached_image(digest)
            if self.metrics and self.settings.vision_cache_mb:
                self.metrics.vision_cache_lookup(cached is not None)
            if cached is not None:  # seen before: no decoding, slicing or vision encoding
                images.append(PreparedImage(None, cached.grid, digest))
                continue
            img = open_image(data, max_pixels=self.settings.max_image_pixels, param=param)
            images.append(prepare_image(img, self.info.cfg, digest, norm=self.info.image_norm))
        if images and self.metrics:
            self.metrics.images_prepared(len(images), time.perf_counter() - t0)
        if images and not self.info.accepts_images:
            raise bad_request("this model does not accept images", param="messages")
        ids = self.prompt_ids(messages)
        grammar = self.checked_grammar(req)  # compiled here, once, in the worker thread (then cached)
        return Prepared(ids, images, self.prompt_bound(ids, images), grammar)

    def count(self, messages: list[Message], urls: list[tuple[str, str]],
              fetched: dict[str, bytes]) -> tuple[list[int], list[PreparedImage]]:
        """What `prepare` makes of a chat's prompt, for /tokenize: its token ids and each image's
        grid (decoded and checked as `prepare` does; nothing sliced, no vision-cache lookup)."""
        images = []
        for url, param in urls:
            img = open_image(self._image_data(url, param, fetched), max_pixels=self.settings.max_image_pixels,
                             param=param)
            anyres = self.info.cfg.has_local_branch or self.info.cfg.image_aspect_ratio == "anyres"
            images.append(PreparedImage(None, choose_grid(*img.size) if anyres else None))
        if images and not self.info.accepts_images:
            raise bad_request("this model does not accept images", param="messages")
        return self.prompt_ids(messages), images

    def prompt_bound(self, ids: list[int], images: list[PreparedImage]) -> int:
        """The prompt's positions, each image at its rows before selection (an upper bound)."""
        return sum(1 for t in ids if t != IMAGE_TOKEN_INDEX) + sum(im.max_rows(self.info.cfg) for im in images)

    def prompt_ids(self, messages: list[Message]) -> list[int]:
        """The templated prompt's token ids, with a -200 placeholder per image."""
        try:
            pieces = build_prompt(messages, self.template)
        except ValueError as e:
            raise bad_request(str(e), param="messages") from None
        return tokenize_prompt(self.info.tokenizer, pieces)

    @staticmethod
    def _image_data(url: str, param: str, fetched: dict[str, bytes]) -> bytes:
        return fetched[param] if is_remote(url) and param in fetched else image_bytes(url, param=param, policy=None)

    def sampling_params(self, req: ChatCompletionRequest, prepared: Prepared) -> SamplingParams:
        max_tokens = self.token_budget(req.max_completion_tokens or req.max_tokens, prepared.max_prompt_tokens)
        return req.to_sampling_params(max_tokens, prepared.grammar)

    def token_budget(self, max_tokens: int | None, prompt_bound: int, *, prompt_param: str = "messages") -> int:
        """The completion's token limit: the one asked for (at most the cap), else the default; a
        400 when the prompt and it do not fit the context."""
        s = self.settings
        if max_tokens is not None and max_tokens > s.max_tokens_cap:
            raise bad_request(f"max_tokens must be at most {s.max_tokens_cap}", param="max_tokens")
        room = s.max_model_len - prompt_bound
        if max_tokens is None:
            max_tokens = min(s.default_max_tokens, room)
        if room < 1 or prompt_bound + max_tokens > s.max_model_len:
            raise APIError(400, f"This model's maximum context length is {s.max_model_len} tokens. The prompt "
                                f"needs up to {prompt_bound} (image rows included) and {max_tokens} were asked "
                                f"for the completion.", param=prompt_param, code="context_length_exceeded")
        return max_tokens

    def checked_grammar(self, req: ChatCompletionRequest):
        """The request's grammar, compiled here once (cached) so that a bad schema is a 400 now,
        not a failure in the engine."""
        spec, param = grammar_for(req)
        if spec is None:
            return None
        with self._grammars_lock:
            if self._grammars is None:
                from model.grammar import shared_compiler

                self._grammars = shared_compiler(self.info.tokenizer, self.info.cfg.vocab_size)
        try:
            self._grammars.compile(spec)
        except GrammarError as e:
            raise bad_request(f"cannot use this schema: {e}", param=param, code="invalid_schema") from None
        return spec

    @staticmethod
    def remote_urls(urls: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """The (url, param) pairs to fetch over the network."""
        return [(u, p) for u, p in urls if is_remote(u)]

    @staticmethod
    def engine_requests(req: ChatCompletionRequest, cid: str, prepared: Prepared,
                        params: SamplingParams) -> list[EngineRequest]:
        """One engine request per choice; choice i of a seeded request draws with seed + i."""
        return [EngineRequest(f"{cid}-{i}", prepared.input_ids, prepared.images,
                              params if i == 0 or params.seed is None else replace(params, seed=params.seed + i),
                              prepared.max_prompt_tokens, slime_selection=req.slime_selection,
                              group=cid if req.n > 1 else None)
                for i in range(req.n)]


def fetch_policy(settings: Settings) -> FetchPolicy | None:
    """How image URLs are fetched (None: they are refused)."""
    if not settings.allow_image_urls:
        return None
    return FetchPolicy(tuple(settings.image_url_domains), settings.image_url_timeout, settings.max_request_bytes,
                       settings.image_url_max_redirects, settings.image_url_allow_private)
