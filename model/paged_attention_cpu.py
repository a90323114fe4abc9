"""Decode attention that reads the paged KV cache in place (CPU, float32), as a compiled loop.

The eager path (`model.llm.paged_decode_attention`) first gathers every sequence's blocks into a
padded `[Hkv, B, span, hd]` copy, then multiplies: on a memory-bound CPU the copy is most of a large
decode step (the blocks are read, written, then read again). This kernel writes each row's new key
and value into its block, then walks the row's block table once: scores, softmax and the weighted
value sum, for the query heads of each KV head together (grouped-query attention reads each key
once). Only the row's own `positions[b] + 1` keys are touched, no padding.

Batch invariance holds by construction: a row's result is computed by the same loop, in the same
order, whatever the other rows are, and whichever thread runs it.

Without numba, `available()` is False and the model keeps the eager path.
"""

from __future__ import annotations

import math

import numpy as np
import torch

try:
    import numba
except ImportError:  # pragma: no cover - numba is a dependency; this keeps a broken install serving
    numba = None


def _jit(fn):
    """Compiled without the GIL and cached on disk (see `model.pillow_bicubic._jit`). The float
    flags let LLVM vectorise the dot products (reassociated sums, fused multiply-adds): a fixed
    order per compiled kernel, so still the same bits for a row whatever the batch. No nnan/ninf."""
    flags = {"reassoc", "contract"}
    try:
        return numba.njit(nogil=True, cache=True, fastmath=flags)(fn)
    except RuntimeError:
        return numba.njit(nogil=True, fastmath=flags)(fn)


if numba is not None:

    @_jit
    def _decode_rows(q, k_new, v_new, kc, vc, tables, positions, out, scale, lo, hi):  # pragma: no cover - compiled
        """Rows lo..hi-1 of a decode step.

        q `[B, H, hd]`, k_new / v_new `[B, Hkv, hd]` (the new token's key and value), kc / vc
        `[Hkv, blocks, block_size, hd]` (one layer of the cache), tables `[B, nblk]` int64,
        positions `[B]` int64 (where each row's new token goes) -> out `[B, H, hd]`.
        """
        h = q.shape[1]
        hd = q.shape[2]
        hkv = kc.shape[0]
        bs = kc.shape[2]
        g = h // hkv
        n_max = 0
        for b in range(lo, hi):
            n_max = max(n_max, positions[b] + 1)
        scores = np.empty((g, n_max), dtype=np.float32)
        acc = np.empty((g, hd), dtype=np.float32)
        total = np.empty(g, dtype=np.float32)
        for b in range(lo, hi):
            p = positions[b]
            n = p + 1
            blk, off = tables[b, p // bs], p % bs
            for kh in range(hkv):
                for d in range(hd):
                    kc[kh, blk, off, d] = k_new[b, kh, d]
                    vc[kh, blk, off, d] = v_new[b, kh, d]
            for kh in range(hkv):
                # q . k for every key, g query heads at a time
                for j in range(n):
                    key = kc[kh, tables[b, j // bs], j % bs]
                    for i in range(g):
                        qrow = q[b, kh * g + i]
                        s = np.float32(0.0)
                        for d in range(hd):
                            s += qrow[d] * key[d]
                        scores[i, j] = s * scale
                for i in range(g):
                    m = scores[i, 0]
                    for j in range(1, n):
                        m = max(m, scores[i, j])
                    t = np.float32(0.0)
                    for j in range(n):
                        e = np.exp(scores[i, j] - m)
                        scores[i, j] = e
                        t += e
                    total[i] = t
                    for d in range(hd):
                        acc[i, d] = 0.0
                for j in range(n):
                    value = vc[kh, tables[b, j // bs], j % bs]
                    for i in range(g):
                        w = scores[i, j]
                        for d in range(hd):
                            acc[i, d] += w * value[d]
                for i in range(g):
                    inv = np.float32(1.0) / total[i]
                    for d in range(hd):
                        out[b, kh * g + i, d] = acc[i, d] * inv


def available() -> bool:
    return numba is not None


def paged_decode_attention_inplace(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                                   v_cache: torch.Tensor, tables: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Write each row's new key and value into its block, then attend over its cached keys.

    q `[B, H, hd]`, k_new / v_new `[B, Hkv, hd]`, k_cache / v_cache `[Hkv, blocks, block_size, hd]`
    (one layer), tables `[B, nblk]`, positions `[B]` -> `[B, H, hd]`. CPU float32 only.
    """
    b, h, hd = q.shape
    out = torch.empty((b, h, hd), dtype=torch.float32)
    _decode_rows(q.contiguous().numpy(), k_new.contiguous().numpy(), v_new.contiguous().numpy(), k_cache.numpy(),
                 v_cache.numpy(), tables.numpy(), positions.numpy(), out.numpy(), np.float32(1.0 / math.sqrt(hd)), 0, b)
    return out


def warm_up() -> None:
    """Compile (or load from numba's cache) the kernel now rather than in the first decode step."""
    if numba is None:
        return
    kc = torch.zeros(1, 2, 16, 4)
    paged_decode_attention_inplace(torch.zeros(1, 2, 4), torch.zeros(1, 1, 4), torch.zeros(1, 1, 4), kc, kc.clone(),
                                   torch.tensor([[1]]), torch.tensor([0]))
