"""SliME's question-conditioned cosine selector (spec section 6)."""

from __future__ import annotations

import torch

# Bound on the [rows, text, D] product materialised at once (elements per chunk).
_CHUNK_ELEMENTS = 1 << 25


def selection_scores(local: torch.Tensor, text: torch.Tensor, num_pad: int = 0) -> torch.Tensor:
    """score_i = sum_j cos(v_i, T_j): local `[K, D]`, text `[Lt, D]` -> `[K]`.

    Bit-identical to the reference's `F.cosine_similarity(v[:, None], T[None], -1).sum(-1)`:
    the same row norms (clamped at 1e-8), the same element-wise products and the same reduction
    over D, without re-computing each norm for every pair. `num_pad` zero text rows are appended
    as the reference does for each image slot, so the sum runs over the same length.
    """
    if num_pad:
        text = torch.cat([text, text.new_zeros(num_pad, text.shape[1])])
    eps = 1e-8
    local_n = local / torch.linalg.vector_norm(local, 2, dim=-1, keepdim=True).clamp_min(eps)
    text_n = text / torch.linalg.vector_norm(text, 2, dim=-1, keepdim=True).clamp_min(eps)  # [Lt, D]
    rows = max(1, _CHUNK_ELEMENTS // max(1, text.shape[0] * text.shape[1]))
    out = []
    for chunk in local_n.split(rows):
        sim = (chunk.unsqueeze(1) * text_n.unsqueeze(0)).sum(dim=-1)  # [k, Lt]
        if num_pad:
            sim[:, -num_pad:] = 0  # the reference masks the padding rows (their cosine is 0 already)
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
