"""A paged KV cache: a pool of fixed-size blocks that sequences address through block tables.

Which blocks a sequence owns is the engine's business (`server/engine/kv_blocks.py`); the model
only reads and writes positions through a table `[nblk]` per sequence: position p of a sequence
lives at offset p % block_size of block table[p // block_size].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .block_table import NULL_BLOCK



class KVCache:
    """`k`, `v`: `[layers, kv_heads, num_blocks, block_size, head_dim]`, allocated once.

    Heads first so that gathering the blocks of B tables (`k[layer][:, tables]`) yields
    `[Hkv, B, nblk, block_size, hd]` contiguous, i.e. `[Hkv, B, span, hd]` without a second copy:
    the batched attention reads it as is.

    `for_slots` builds a cache whose tables are fixed contiguous ranges ("slots"), for callers
    that run a fixed set of sequences (one-off generation, tests, benchmarks).
    """

    def __init__(self, *, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        if num_blocks < 2:
            raise ValueError("a KV cache needs the null block and at least one more")
        shape = (num_layers, num_kv_heads, num_blocks, block_size, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._numpy: list[tuple] | None = None
        self._slot_blocks = 0  # blocks per slot, with `for_slots`

    @classmethod
    def for_slots(cls, *, num_slots: int, max_len: int, block_size: int = 16, **kw) -> "KVCache":
        per_slot = -(-max_len // block_size)
        cache = cls(num_blocks=1 + num_slots * per_slot, block_size=block_size, **kw)
        cache._slot_blocks = per_slot
        return cache

    def slot_table(self, slot: int) -> list[int]:
        """The block table of slot `slot` of a `for_slots` cache."""
        n = self._slot_blocks
        if not n or not 0 <= slot < (self.num_blocks - 1) // n:
            raise IndexError(f"no slot {slot} in this cache")
        return list(range(1 + slot * n, 1 + (slot + 1) * n))

    @property
    def max_len(self) -> int:
        """Positions one sequence can hold at most (all blocks but the null one)."""
        return (self.num_blocks - 1) * self.block_size

    @staticmethod
    def bytes_per_token(*, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def numpy_layer(self, layer: int) -> tuple:
        """Layer `layer`'s keys and values `[Hkv, blocks, block_size, hd]` as numpy views of the
        cache (CPU), made once: compiled kernels read and write them in place."""
        if self._numpy is None:
            self._numpy = [(self.k[i].numpy(), self.v[i].numpy()) for i in range(self.k.shape[0])]
        return self._numpy[layer]

    # -- addressing --------------------------------------------------------------------------------
    def tables(self, tables: Sequence[Sequence[int]], span: int) -> torch.Tensor:
        """Block tables `[B, span // block_size]` on the cache's device, padded with the null block."""
        cols = span // self.block_size
        rows = [list(t[:cols]) + [NULL_BLOCK] * (cols - len(t)) for t in tables]
        return torch.tensor(rows, dtype=torch.long, device=self.k.device)

    def where(self, table: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Blocks and offsets `[N]` of `positions` `[N]` in `table` (`[N, nblk]`, one row each, or
        `[nblk]` shared). Device ops only (capturable)."""
        col = torch.div(positions, self.block_size, rounding_mode="floor")
        blocks = table[col] if table.dim() == 1 else table.gather(1, col.view(-1, 1)).view(-1)
        return blocks, positions - col * self.block_size

    def write(self, layer: int, blocks: torch.Tensor, offsets: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v `[Hkv, N, hd]` at (blocks[i], offsets[i])."""
        self.k[layer][:, blocks, offsets] = k
        self.v[layer][:, blocks, offsets] = v

    def copy_blocks(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Blocks dst[i] := blocks src[i], every layer (copy on write of a shared block)."""
        self.k[:, :, dst] = self.k[:, :, src]
        self.v[:, :, dst] = self.v[:, :, src]

    def gather(self, layer: int, tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values of B tables `[B, nblk]` -> `[Hkv, B, nblk * block_size, hd]` each."""
        hkv, _, bs, hd = self.k.shape[1:]
        b, n = tables.shape
        k = self.k[layer][:, tables].view(hkv, b, n * bs, hd)
        v = self.v[layer][:, tables].view(hkv, b, n * bs, hd)
        return k, v
