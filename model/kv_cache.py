"""A preallocated, slot-based KV cache: one row per running sequence, bounded at construction."""

from __future__ import annotations

import torch


class KVCache:
    """`k`, `v`: `[layers, slots, kv_heads, max_len, head_dim]`, allocated once.

    A sequence owns one slot for its lifetime; the engine decides which (and compacts them so
    that running sequences occupy slots 0..B-1 and a decode step reads a view, not a gather).

    With `keys_transposed` the keys are stored `[..., head_dim, max_len]` and `k` is a transposed
    view of that storage (same indexing for readers and writers): the CPU decode kernel's
    `q @ K^T` then reads K^T row-major, ~1.5x faster than through a transposed [T, hd] block.
    """

    def __init__(self, *, num_layers: int, num_slots: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, keys_transposed: bool = False):
        shape = (num_layers, num_slots, num_kv_heads, max_len, head_dim)
        if keys_transposed:
            self.k = torch.zeros(shape[:3] + (head_dim, max_len), dtype=dtype, device=device).transpose(-1, -2)
        else:
            self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.keys_transposed = keys_transposed
        self.num_slots = num_slots
        self.max_len = max_len

    @staticmethod
    def bytes_per_token(*, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def move_slot(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of slot `src` into slot `dst` (compaction)."""
        if src != dst and length > 0:
            self.k[:, dst, :, :length] = self.k[:, src, :, :length]
            self.v[:, dst, :, :length] = self.v[:, src, :, :length]
