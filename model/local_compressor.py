"""The reference's local compressor: a learnable-query cross-attention `Resampler` (spec section 3).

The class keeps the reference's name (`Resampler`); it has nothing to do with image resizing, which
is `pillow_bicubic.py`. Used twice: for local compression (144 queries, `modeling.post_qformer`)
and in the global mixture of adapters (576 queries). Attention is `torch.nn.MultiheadAttention`,
called as the reference calls it, so its numbers are the reference's.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def sincos_pos_embed_2d(embed_dim: int, grid: int) -> np.ndarray:
    """MAE 2-D sin-cos table `[grid*grid, E]`: first half encodes the column, second the row.

    Checkpoints carry this table (float16-rounded); it is computed only for fresh checkpoints.
    """
    assert embed_dim % 4 == 0
    omega = np.arange(embed_dim // 4, dtype=np.float32) / (embed_dim / 4.0)
    omega = 1.0 / 10000**omega  # [E/4]
    cols, rows = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))

    def encode(pos: np.ndarray) -> np.ndarray:
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([encode(cols), encode(rows)], axis=1)


def interpolate_pos_embed(pos_embed: torch.Tensor, side: int) -> torch.Tensor:
    """`[g*g, E]` -> `[side*side, E]`: bicubic in float32, rounded back to the table's dtype."""
    g = int(math.isqrt(pos_embed.shape[0]))
    grid = pos_embed.float().reshape(1, g, g, -1).permute(0, 3, 1, 2)
    out = F.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False)
    return out.permute(0, 2, 3, 1).flatten(0, 2).to(pos_embed.dtype)


class Resampler(nn.Module):
    """x `[N, L, kv_dim]` (L a square) -> `[N, Q, E]`."""

    def __init__(self, *, grid_size: int, embed_dim: int, num_heads: int, kv_dim: int | None = None):
        super().__init__()
        self.grid_size = grid_size
        self.num_queries = grid_size * grid_size
        self.embed_dim = embed_dim
        # float16 in the reference whatever the model's dtype: kept so, loaded from the checkpoint.
        self.pos_embed = nn.Parameter(torch.zeros(self.num_queries, embed_dim, dtype=torch.float16),
                                      requires_grad=False)
        self.query = nn.Parameter(torch.zeros(self.num_queries, embed_dim))
        self.kv_proj = (nn.Linear(kv_dim, embed_dim, bias=False)
                        if kv_dim is not None and kv_dim != embed_dim else nn.Identity())
        self.attn = nn.MultiheadAttention(embed_dim, num_heads)
        self.ln_q = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_post = nn.LayerNorm(embed_dim, eps=1e-6)
        self._key_pos: dict[int, torch.Tensor] = {}

    def key_positions(self, length: int) -> torch.Tensor:
        """Key position table for L keys, `[L, E]` in pos_embed's dtype; computed once per L."""
        side = int(math.isqrt(length))
        if side * side != length:
            raise ValueError(f"Resampler input length {length} is not a square")
        cached = self._key_pos.get(length)
        if cached is None or cached.device != self.pos_embed.device:
            cached = interpolate_pos_embed(self.pos_embed.detach(), side)
            self._key_pos[length] = cached
        return cached

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, _ = x.shape
        key_pos = self.key_positions(length)
        kv = self.ln_kv(self.kv_proj(x)).permute(1, 0, 2)  # [L, N, E]
        q = self.ln_q(self.query)
        dtype = kv.dtype
        # fp32 model: fp32 + fp16 promotes exactly as in the reference; half models stay in their dtype.
        query = (q.unsqueeze(1).expand(-1, n, -1) + self.pos_embed.unsqueeze(1)).to(dtype)  # [Q, N, E]
        key = (kv + key_pos.unsqueeze(1)).to(dtype)
        out = self.attn(query, key, kv)[0]  # [Q, N, E]
        return self.ln_post(out.permute(1, 0, 2))  # [N, Q, E]
