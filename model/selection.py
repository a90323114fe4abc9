"""SliME's question-conditioned cosine selector (spec section 6)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Bound on the [rows, text, D] broadcast inside cosine_similarity (elements per chunk).
_CHUNK_ELEMENTS = 1 << 25


def selection_scores(local: torch.Tensor, text: torch.Tensor, num_pad: int = 0) -> torch.Tensor:
    """score_i = sum_j cos(v_i, T_j): local `[K, D]`, text `[Lt, D]` -> `[K]` float.

    `num_pad` zero text rows are appended as the reference does for each image slot, so that the
    reduction runs over the same length and gives the reference's exact sums.
    """
    if num_pad:
        text = torch.cat([text, text.new_zeros(num_pad, text.shape[1])])
    rows = max(1, _CHUNK_ELEMENTS // max(1, text.shape[0] * text.shape[1]))
    out = []
    for chunk in local.split(rows):
        sim = F.cosine_similarity(chunk.unsqueeze(1), text.unsqueeze(0), dim=-1)  # [k, Lt]
        if num_pad:
            sim[:, -num_pad:] = 0
        out.append(sim.sum(dim=-1))
    return torch.cat(out)


def select_tokens(scores: torch.Tensor, *, topp: float, temp: float) -> torch.Tensor:
    """Indices (ascending) of the local tokens to keep: the smallest prefix of tokens sorted by
    softmax(score / temp) whose mass passes `topp`, i.e. the c tokens with cumsum <= topp, plus one."""
    probs = torch.softmax(scores / temp, dim=-1)
    sorted_probs, order = torch.sort(probs, descending=True)
    within = int((torch.cumsum(sorted_probs, dim=0) <= topp).sum())
    if within < order.numel():
        keep = order[: within + 1]
    else:
        keep = torch.arange(order.numel(), device=order.device)
    return keep.sort().values
