"""Decode attention that reads the paged KV cache in place (CPU, float32), as a compiled loop.

The eager path (`model.llm.paged_decode_attention`) first gathers every sequence's blocks into a
padded `[Hkv, B, span, hd]` copy, then multiplies: on a memory-bound CPU the copy is most of a large
decode step (the blocks are read, written, then read again). This kernel writes each row's new key
and value into its block, then walks the row's block table once: scores, softmax and the weighted
value sum, for the query heads of each KV head together (grouped-query attention reads each key
once). Only the row's own `positions[b] + 1` keys are touched, no padding. RoPE on the new query
and key happens here too, in the reference's arithmetic: one call per layer replaces ~15 small ops
that cost more than their work at small batches.

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


# Float flags for the attention loops: LLVM may reassociate the dot products and value sums (to
# vectorise them) and fuse multiply-adds. The order is fixed per compiled kernel, so a row still
# gets the same bits whatever the batch. No nnan/ninf: infinities and NaNs behave.
ATTENTION_FLAGS = {"reassoc", "contract"}


def _jit(fn=None, *, fastmath=False):
    """Compiled without the GIL and cached on disk (see `model.pillow_bicubic._jit`)."""
    if fn is None:
        return lambda f: _jit(f, fastmath=fastmath)
    try:
        return numba.njit(nogil=True, cache=True, fastmath=fastmath)(fn)
    except RuntimeError:
        return numba.njit(nogil=True, fastmath=fastmath)(fn)


if numba is not None:

    @_jit
    def _rope_row(dst, x, cos, sin):  # pragma: no cover - compiled
        """dst = x * cos + rotate_half(x) * sin for one head `[hd]`: the reference's RoPE, each
        product and the sum rounded on their own as torch's three kernels round them (no fastmath,
        no fused multiply-add), so a key is the bits the eager RoPE gives."""
        half = x.shape[0] // 2
        for d in range(half):
            dst[d] = x[d] * cos[d] + (-x[d + half]) * sin[d]
        for d in range(half, 2 * half):
            dst[d] = x[d] * cos[d] + x[d - half] * sin[d]

    @_jit(fastmath=ATTENTION_FLAGS)
    def _decode_rows(qkv, cos, sin, kc, vc, tables, positions, out, scale):  # pragma: no cover - compiled
        """One decode step's attention for every row.

        qkv `[B, H + 2 Hkv, hd]` (the fused projection's output: query heads, key heads, value
        heads, before RoPE), cos / sin `[B, hd]` (each row's position), kc / vc `[Hkv, blocks,
        block_size, hd]` (one layer of the cache), tables `[B, nblk]` int64, positions `[B]`
        int64 -> out `[B, H, hd]`.
        """
        b_rows = qkv.shape[0]
        hd = qkv.shape[2]
        hkv = kc.shape[0]
        h = qkv.shape[1] - 2 * hkv
        bs = kc.shape[2]
        g = h // hkv
        n_max = 0
        for b in range(b_rows):
            n_max = max(n_max, positions[b] + 1)
        scores = np.empty((g, n_max), dtype=np.float32)
        acc = np.empty((g, hd), dtype=np.float32)
        total = np.empty(g, dtype=np.float32)
        q = np.empty((h, hd), dtype=np.float32)
        for b in range(b_rows):
            p = positions[b]
            n = p + 1
            blk, off = tables[b, p // bs], p % bs
            for kh in range(hkv):  # the new key (after RoPE) and value go in first: the row reads them
                _rope_row(kc[kh, blk, off], qkv[b, h + kh], cos[b], sin[b])
                vc[kh, blk, off, :] = qkv[b, h + hkv + kh]
            for i in range(h):
                _rope_row(q[i], qkv[b, i], cos[b], sin[b])
            for kh in range(hkv):
                # q . k for every key, the g query heads of this KV head together (one read per key)
                for j in range(n):
                    key = kc[kh, tables[b, j // bs], j % bs]
                    for i in range(g):
                        qrow = q[kh * g + i]
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


class DecodeStep:
    """What every layer's call shares in one decode step, converted once: cos / sin `[B, hd]`
    (each row's position), block tables `[B, nblk]` and positions `[B]`."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor, tables: torch.Tensor, positions: torch.Tensor):
        self.cos, self.sin = cos.contiguous().numpy(), sin.contiguous().numpy()
        self.tables, self.positions = tables.contiguous().numpy(), positions.contiguous().numpy()
        self._checked: tuple[int, int] | None = None  # (blocks, block_size) of the cache checked against

    def check(self, num_blocks: int, block_size: int) -> None:
        """The compiled loop has no bounds checks: a bad block id or position would write outside
        the cache instead of raising. Checked once per step (every layer's cache has one shape)."""
        if self._checked == (num_blocks, block_size):
            return
        b, nblk = self.tables.shape
        if self.positions.shape != (b,) or self.cos.shape[0] != b or self.sin.shape[0] != b:
            raise ValueError("decode step: cos, sin, tables and positions disagree on the rows")
        if b:
            if self.positions.min() < 0 or self.positions.max() // block_size >= nblk:
                raise IndexError(f"decode step: a position lies outside its row's {nblk} blocks")
            if self.tables.min() < 0 or self.tables.max() >= num_blocks:  # padding is the null block, 0
                raise IndexError(f"decode step: a block id lies outside the cache's {num_blocks} blocks")
        self._checked = (num_blocks, block_size)


def decode_attention(qkv: torch.Tensor, step: DecodeStep, k_cache: np.ndarray, v_cache: np.ndarray) -> torch.Tensor:
    """RoPE, the cache write and attention of one decode step, for one layer.

    qkv `[B, H + 2 Hkv, hd]` (before RoPE), k_cache / v_cache `[Hkv, blocks, block_size, hd]` (one
    layer, as numpy views: see `KVCache.numpy_layer`) -> `[B, H * hd]`. CPU float32 only.
    """
    b, heads, hd = qkv.shape
    h = heads - 2 * k_cache.shape[0]
    if (b != step.positions.shape[0] or step.cos.shape[1] != hd or k_cache.shape[3] != hd
            or v_cache.shape != k_cache.shape or h < k_cache.shape[0] or h % k_cache.shape[0]):
        raise ValueError(f"decode step: qkv {tuple(qkv.shape)} does not fit the step or the cache {k_cache.shape}")
    step.check(k_cache.shape[1], k_cache.shape[2])
    out = torch.empty((b, h * hd), dtype=torch.float32)
    _decode_rows(qkv.contiguous().numpy(), step.cos, step.sin, k_cache, v_cache, step.tables, step.positions,
                 out.numpy().reshape(b, h, hd), np.float32(1.0 / math.sqrt(hd)))
    return out


def warm_up() -> None:
    """Compile (or load from numba's cache) the kernel now rather than in the first decode step."""
    if numba is None:
        return
    kc = np.zeros((1, 2, 16, 4), dtype=np.float32)
    step = DecodeStep(torch.ones(1, 4), torch.zeros(1, 4), torch.tensor([[1]]), torch.tensor([0]))
    decode_attention(torch.zeros(1, 3, 4), step, kc, kc.copy())
