"""One-sequence generation on the model stages: the one-shot path the CLI and tests use.

The serving engine batches many sequences; this path is the plain, unbatched definition of what
each of them must produce.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from PIL import Image

from .loading import LoadedModel
from .modeling import ImageReport
from .processor import prepare_image, tokenize_prompt
from .sampling import SamplingParams, SequenceSampler, sample
from .templates import Message, build_prompt


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]  # generated ids (the stop token included when one ended generation)
    prompt_tokens: int  # positions the LLM saw, image rows included
    images: list[ImageReport]
    finish_reason: str  # stop | length


def prepare_prompt(lm: LoadedModel, messages: Sequence[Message], images: Sequence[Image.Image],
                   template: str | None = None) -> tuple[list[int], list]:
    pieces = build_prompt(messages, template or lm.template)
    ids = tokenize_prompt(lm.tokenizer, pieces)
    prepared = [prepare_image(im, lm.cfg, norm=lm.image_norm) for im in images]
    return ids, prepared


@torch.inference_mode()
def generate(lm: LoadedModel, messages: Sequence[Message], images: Sequence[Image.Image], params: SamplingParams,
             *, template: str | None = None) -> GenerationResult:
    model = lm.model
    ids, prepared = prepare_prompt(lm, messages, images, template)
    feats = []
    if prepared:
        feats = model.encode_images([torch.from_numpy(p.pixels) for p in prepared], [p.grid for p in prepared])
    embeds, reports = model.embed_prompt(ids, feats)
    prompt_len = embeds.shape[0]
    cache = model.llm.new_cache(num_slots=1, max_len=prompt_len + params.max_tokens, dtype=lm.dtype, device=lm.device)
    hidden = model.llm.prefill(embeds, cache, slot=0, start=0)
    seq = SequenceSampler(params, ids, lm.device)
    stops = set() if params.ignore_eos else set(lm.eos_token_ids)
    out: list[int] = []
    finish = "length"
    pos = prompt_len
    while len(out) < params.max_tokens:
        tokens, _ = sample(model.llm.logits(hidden.unsqueeze(0)), [seq])
        out.append(tokens[0])
        if tokens[0] in stops:
            finish = "stop"
            break
        if len(out) == params.max_tokens:
            break
        emb = model.llm.embed(torch.tensor(tokens, device=lm.device))
        hidden = model.llm.decode(emb, [pos], cache)[0]
        pos += 1
    text = lm.tokenizer.decode(out, skip_special_tokens=True).strip()
    return GenerationResult(text, out, prompt_len, reports, finish)
