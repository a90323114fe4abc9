"""POST /tokenize and /detokenize (as vLLM has them): a prompt or a chat's messages -> token ids and
the count that admission uses; token ids -> text. Image rows are counted as `usage` counts them
before selection: SliME keeps only the local tokens that matter for the question, which is known
only once the image is encoded, so `count` is an upper bound for an image with a local branch (the
one admission checks against the context length) and exact otherwise."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from pydantic import Field, model_validator

from .errors import APIError, bad_request
from .protocol import ChatCompletionRequest, ChatMessage, StrictModel, check_unicode

if TYPE_CHECKING:
    from .chat import ChatService


class _CheckedBody(StrictModel):
    """A request model whose strings are checked for lone surrogates."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        check_unicode(data)
        return data


class TokenizeRequest(_CheckedBody):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = True  # prompt only: a chat's template decides its own
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either prompt or messages")
        return self


class DetokenizeRequest(_CheckedBody):
    model: str | None = None
    tokens: list[int] = Field(max_length=1_000_000)


class TokenizeService:
    def __init__(self, chat: "ChatService"):
        self.chat = chat
        self.tokenizer = chat.tokenizer

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.chat.model_name:
            raise APIError(404, f"The model '{model}' does not exist; this server serves '{self.chat.model_name}'",
                           param="model", code="model_not_found")

    async def tokenize(self, req: TokenizeRequest) -> dict[str, Any]:
        self._check_model(req.model)
        images: list[dict[str, Any]] = []
        if req.prompt is not None:
            ids = await asyncio.to_thread(
                lambda: self.tokenizer(req.prompt, add_special_tokens=req.add_special_tokens).input_ids)
            count = len(ids)
        else:
            chat_req = ChatCompletionRequest(model=self.chat.model_name, messages=req.messages)
            preparer = self.chat.preparer
            messages, urls = preparer.messages(chat_req)
            fetched = await self.chat.fetch_images(urls)
            ids, prepared = await asyncio.get_running_loop().run_in_executor(
                self.chat.pool, preparer.count, messages, urls, fetched)
            count = preparer.prompt_bound(ids, prepared)
            cfg = preparer.info.cfg
            images = [{"grid": list(im.grid) if im.grid else None, "rows": im.max_rows(cfg),
                       "exact": im.grid is None or not cfg.has_local_branch or cfg.use_global_only}
                      for im in prepared]
        out: dict[str, Any] = {"count": count, "max_model_len": self.chat.settings.max_model_len, "tokens": ids}
        if req.messages is not None:
            out["images"] = images  # each image's rows in `count`, at the -200 placeholder in `tokens`
        if req.return_token_strs:
            out["token_strs"] = [None if t < 0 else s for t, s in
                                 zip(ids, self.tokenizer.convert_ids_to_tokens([max(t, 0) for t in ids]))]
        return out

    async def detokenize(self, req: DetokenizeRequest) -> dict[str, Any]:
        self._check_model(req.model)
        vocab = len(self.tokenizer)
        for i, t in enumerate(req.tokens):
            if not 0 <= t < vocab:
                raise bad_request(f"token id {t} is not in the vocabulary (0..{vocab - 1})", param=f"tokens.{i}")
        return {"prompt": await asyncio.to_thread(self.tokenizer.decode, req.tokens)}

