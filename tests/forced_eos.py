"""Make a loaded model emit its EOS token where it would otherwise emit a given token.

The tiny checkpoint's random weights practically never pick an EOS token, so nothing shows that
generation stops at one. `force_eos` gives EOS the lm_head row of `token` plus a small bias: EOS's
logit is then `token`'s plus `margin`, so greedy decoding picks EOS exactly at the first step where
it would have picked `token` (the hidden states, and so every earlier step, are unchanged: the
tiny checkpoint's lm_head is not tied to the embeddings).
"""

from __future__ import annotations

import torch


def force_eos(lm, eos: int, token: int, margin: float = 1e-3) -> None:
    llm = lm.model.llm
    old = llm.lm_head
    assert old.weight.data_ptr() != llm.model.embed_tokens.weight.data_ptr(), "lm_head is tied to the embeddings"
    new = torch.nn.Linear(old.in_features, old.out_features, bias=True, dtype=old.weight.dtype,
                          device=old.weight.device)
    with torch.no_grad():
        new.weight.copy_(old.weight)
        new.weight[eos] = old.weight[token]
        new.bias.zero_()
        new.bias[eos] = margin
    new.requires_grad_(False)
    llm.lm_head = new


def expected_stop(free_run: list[int], token: int, eos: int) -> list[int]:
    """What greedy decoding gives after `force_eos(lm, eos, token)`, from the unmodified run
    (which must contain `token` and no `eos`): everything before `token`'s first place, then EOS."""
    assert eos not in free_run and token in free_run
    return free_run[:free_run.index(token)] + [eos]
