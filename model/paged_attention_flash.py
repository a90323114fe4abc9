"""Attention over the paged KV cache through flash-attn 2's paged path (`flash_attn_with_kvcache`
with a `block_table`), when flash-attn is installed (CUDA, float16/bfloat16).

flash-attn reads each sequence's blocks where they lie, for decode (one query per row) and for a
prompt chunk after a cached prefix alike: with `causal=True` the queries align to the end of the
keys, so query i of a T-query chunk over L keys sees keys 0..L-T+i. The new K/V are written into
the cache before the call (`KVCache.write`), so `cache_seqlens` counts them.

Its paged path takes blocks of a multiple of 256 positions (`BLOCK_SIZE`; the runner sizes the
cache that way for this backend), int32 tables and lengths, and a cache `[blocks, block_size,
Hkv, hd]` with a contiguous last dimension: a permuted view of our `[Hkv, blocks, block_size, hd]`
layer, read through its strides (no copy).

Shapes: q `[B, T, H, hd]`; a layer's cache `[Hkv, blocks, block_size, hd]`; tables `[B, nblk]`
int32 (the null block past a sequence's end); lengths `[B]` int32 (keys per row, the new ones
included) -> `[B, T, H, hd]`.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

BLOCK_SIZE = 256  # flash-attn 2: "Paged KV cache block size must be divisible by 256"


@functools.cache
def _kernel() -> Callable | None:
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError:
        return None
    return flash_attn_with_kvcache


def available() -> bool:
    return _kernel() is not None


def runs_on(device: torch.device) -> bool:
    """flash-attn 2 is installed and its kernels run on this device (CUDA, Ampere or later: it
    refuses older GPUs such as the T4 and V100)."""
    return available() and device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def block_size(requested: int) -> int:
    """The smallest block size this backend takes at or above `requested`."""
    return max(BLOCK_SIZE, -(-requested // BLOCK_SIZE) * BLOCK_SIZE)


def attend(q: torch.Tensor, k_layer: torch.Tensor, v_layer: torch.Tensor, tables: torch.Tensor,
           lengths: torch.Tensor) -> torch.Tensor:
    """q `[B, T, H, hd]` over each row's first `lengths[b]` cached keys, causally aligned to the end
    (see the module docstring) -> `[B, T, H, hd]`."""
    kernel = _kernel()
    if kernel is None:
        raise RuntimeError("the flash attention backend needs flash-attn (pip install 'slime-serve[gpu]')")
    return kernel(q, k_layer.permute(1, 2, 0, 3), v_layer.permute(1, 2, 0, 3), cache_seqlens=lengths,
                  block_table=tables, causal=True)
