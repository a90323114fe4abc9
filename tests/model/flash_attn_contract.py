"""flash-attn 2's `flash_attn_with_kvcache` as its documentation and argument checks define it, in
plain torch, for machines without CUDA or flash-attn: the tests install it as the `flash_attn`
module to check what our flash backend passes (layout, strides, dtypes, the 256-position blocks,
lengths and the end-aligned causal mask). The real kernel runs in tests/model/test_gpu.py when a
GPU with flash-attn is there.
"""

from __future__ import annotations

import sys
import types

import torch

calls: list[dict] = []  # shapes of each call, for tests that check which path ran
half_only = True  # flash-attn runs fp16/bf16 only; the tiny-checkpoint tests lift this to compare float32 tokens


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    """q `[B, Tq, H, hd]`; paged caches `[num_blocks, block_size, Hkv, hd]`; block_table `[B, nblk]`
    int32; cache_seqlens `[B]` int32 -> `[B, Tq, H, hd]`. Only what our backend uses is modelled:
    no new k/v, no rotary, no windows."""
    assert k is None and v is None and rotary_cos is None and cache_batch_idx is None and alibi_slopes is None
    for t in (q, k_cache, v_cache):
        if t.stride(-1) != 1:
            raise RuntimeError("Input tensor must have contiguous last dimension")
    if half_only and q.dtype not in (torch.float16, torch.bfloat16):
        raise RuntimeError("FlashAttention only support fp16 and bf16 data type")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise RuntimeError("query and key must have the same dtype")
    if len({t.device for t in (q, k_cache, v_cache, block_table, cache_seqlens)}) != 1:
        raise RuntimeError("all tensors must be on the same device")
    if block_table is None or block_table.dtype != torch.int32:
        raise RuntimeError("block_table must have dtype torch.int32")
    if block_table.stride(-1) != 1:
        raise RuntimeError("block_table must have contiguous last dimension")
    if cache_seqlens is None or cache_seqlens.dtype != torch.int32:
        raise RuntimeError("cache_seqlens must have dtype int32")
    b, tq, h, hd = q.shape
    num_blocks, block_size, hkv, _ = k_cache.shape
    if block_size % 256:
        raise RuntimeError("Paged KV cache block size must be divisible by 256")
    if block_table.dim() != 2 or block_table.shape[0] != b or h % hkv or v_cache.shape != k_cache.shape:
        raise RuntimeError("block_table must have shape [batch_size, max_num_blocks_per_seq]")
    if cache_seqlens.shape != (b,) or int(cache_seqlens.max()) > block_table.shape[1] * block_size \
            or int(block_table.max()) >= num_blocks or int(block_table.min()) < 0:
        # past these bounds the real kernel reads memory it does not own, silently
        raise RuntimeError("cache_seqlens / block_table out of bounds")
    if int(cache_seqlens.min()) < tq:  # ours: each query sees its own key at least
        raise RuntimeError("a row has fewer keys than queries")
    scale = softmax_scale if softmax_scale is not None else hd ** -0.5
    calls.append({"batch": b, "queries": tq, "blocks": block_table.shape[1]})
    out = torch.empty_like(q)
    for row in range(b):
        n = int(cache_seqlens[row])
        blocks = block_table[row, :-(-n // block_size)].long()
        keys = k_cache[blocks].reshape(-1, hkv, hd)[:n].float()  # [n, Hkv, hd]
        values = v_cache[blocks].reshape(-1, hkv, hd)[:n].float()
        keys, values = (x.repeat_interleave(h // hkv, dim=1).transpose(0, 1) for x in (keys, values))  # [H, n, hd]
        scores = q[row].float().transpose(0, 1) @ keys.transpose(1, 2) * scale  # [H, Tq, n]
        if causal:  # aligned to the end: query i sees keys 0..n - Tq + i
            seen = torch.arange(n).view(1, n) <= torch.arange(n - tq, n).view(tq, 1)
            scores = scores.masked_fill(~seen, float("-inf"))
        out[row] = (torch.softmax(scores, dim=-1) @ values).transpose(0, 1).to(q.dtype)
    return out


def install(monkeypatch, half_only: bool = True) -> None:
    """This module as `flash_attn` for one test (pair with `reset` after it); `half_only=False`
    lets float32 through, for the tiny checkpoint's exact tokens on the CPU."""
    module = types.ModuleType("flash_attn")
    module.flash_attn_with_kvcache = flash_attn_with_kvcache
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    monkeypatch.setattr(sys.modules[__name__], "half_only", half_only)
    reset()


def reset() -> None:
    """Our backend's cached import of flash-attn forgotten, the recorded calls too."""
    from model import paged_attention_flash

    paged_attention_flash._kernel.cache_clear()
    calls.clear()
