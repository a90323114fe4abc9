"""Greedy decoding of several prompts straight through the model (no engine), for tests that
compare attention backends token for token."""

from __future__ import annotations

import torch


def greedy_tokens(lm, prompts: list[list[int]], *, steps: int, max_len: int, chunk: int | None = None):
    """Each prompt prefilled into its own slot (in chunks of `chunk` positions, or whole), then all
    decoded together, one batch a step -> (tokens per prompt, the cache's block size)."""
    llm = lm.model.llm
    cache = llm.new_cache(num_slots=len(prompts), max_len=max_len)
    hidden = []
    for slot, p in enumerate(prompts):
        emb = llm.embed(torch.tensor(p))
        step = chunk or len(p)
        for start in range(0, len(p), step):
            h = llm.prefill(emb[start:start + step], cache, slot=slot, start=start)
        hidden.append(h)
    tokens = [[int(llm.logits(h).argmax())] for h in hidden]
    positions = [len(p) for p in prompts]
    for _ in range(steps):
        hidden = llm.decode(llm.embed(torch.tensor([t[-1] for t in tokens])), positions, cache)
        for t, row in zip(tokens, llm.logits(hidden).argmax(-1).tolist()):
            t.append(row)
        positions = [p + 1 for p in positions]
    return tokens, cache.block_size
