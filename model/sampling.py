"""Sampling parameters and a batched sampler (greedy, temperature, top-k/top-p, penalties, seeds)."""

from __future__ import annotations

import torch

from .sampling_params import SamplingParams, TokenLogprob

__all__ = ["SamplingParams", "SequenceSampler", "TokenLogprob", "filtered_probs", "sample"]


class SequenceSampler:
    """Per-sequence sampling state: its params, its RNG, and the counts penalties need."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], device: torch.device):
        self.params = params
        self.generator: torch.Generator | None = None
        if not params.greedy:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(params.seed if params.seed is not None else torch.seed() % (2**63))
        self.counts: torch.Tensor | None = None  # [V] generated-token counts
        self.seen: set[int] = set(t for t in prompt_ids if t >= 0) if params.repetition_penalty != 1.0 else set()

    def observe(self, token: int, vocab: int, device: torch.device) -> None:
        if not self.params.penalised:
            return
        if self.counts is None:
            self.counts = torch.zeros(vocab, device=device)
        self.counts[token] += 1
        if self.params.repetition_penalty != 1.0:
            self.seen.add(token)

    def adjust(self, logits: torch.Tensor) -> torch.Tensor:
        """Penalties on one row `[V]` (returns a new tensor)."""
        p = self.params
        logits = logits.clone()
        if p.repetition_penalty != 1.0 and self.seen:
            ids = torch.tensor(sorted(self.seen), device=logits.device)
            vals = logits[ids]
            logits[ids] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if self.counts is not None and (p.presence_penalty or p.frequency_penalty):
            logits -= p.frequency_penalty * self.counts + p.presence_penalty * (self.counts > 0).float()
        return logits


def filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, top-k and top-p for a batch of rows at once: `[S, V]` -> probabilities `[S, V]`."""
    s, vocab = logits.shape
    device = logits.device
    temps = torch.tensor([p.temperature for p in params], device=device).unsqueeze(1)
    scaled = logits / temps
    ks = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=device).unsqueeze(1)
    top_p = torch.tensor([p.top_p for p in params], device=device).unsqueeze(1)
    sorted_vals, order = torch.sort(scaled, descending=True, dim=-1)
    ranks = torch.arange(vocab, device=device).unsqueeze(0)
    sorted_vals = sorted_vals.masked_fill(ranks >= ks, float("-inf"))  # top-k
    sorted_probs = torch.softmax(sorted_vals, dim=-1)
    # top-p: drop a token once the mass before it already reaches top_p (the first always stays)
    drop_sorted = ((torch.cumsum(sorted_probs, dim=-1) - sorted_probs) >= top_p) | (ranks >= ks)
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    return torch.softmax(scaled.masked_fill(drop, float("-inf")), dim=-1)


def sample(logits: torch.Tensor, seqs: list[SequenceSampler]) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits `[B, V]` float32 -> one token per row (one host sync for the whole batch)."""
    b, vocab = logits.shape
    if any(s.params.penalised for s in seqs):
        logits = torch.stack([s.adjust(logits[i]) if s.params.penalised else logits[i] for i, s in enumerate(seqs)])
    tokens = logits.argmax(dim=-1)
    sampled = [i for i, s in enumerate(seqs) if not s.params.greedy]
    if sampled:
        tokens = tokens.clone()
        probs = filtered_probs(logits[sampled], [seqs[i].params for i in sampled])  # [S, V]
        # One draw per row from that request's own generator (seeded requests reproduce).
        for j, i in enumerate(sampled):
            tokens[i] = torch.multinomial(probs[j], 1, generator=seqs[i].generator)[0]
    token_list = tokens.tolist()
    infos: list[TokenLogprob | None] = [None] * b
    want = [i for i, s in enumerate(seqs) if s.params.logprobs]
    if want:
        logp = torch.log_softmax(logits[want].float(), dim=-1)
        for j, i in enumerate(want):
            k = seqs[i].params.top_logprobs
            top: list[tuple[int, float]] = []
            if k:
                v, ix = torch.topk(logp[j], k)
                top = [(t, lp) for t, lp in zip(ix.tolist(), v.tolist()) if lp != float("-inf")]  # masked out
            infos[i] = TokenLogprob(token_list[i], float(logp[j, token_list[i]]), top)
    for s, t in zip(seqs, token_list):
        s.observe(t, vocab, logits.device)
    return token_list, infos
