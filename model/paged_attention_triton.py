"""Paged decode attention in Triton: each sequence's keys and values are read where they lie in the
block pool, through its block table (no gather into a padded copy, no mask tensor).

One program per (sequence, KV head) handles the query heads that share that KV head (GQA), walking
the sequence's positions `BLOCK_N` at a time with an online softmax. The split-K variant
(flash-decoding) gives each program a range of positions and merges the partial results in a
second kernel: at small batches and long contexts a (sequence, KV head) grid alone leaves most of a
GPU idle. Shapes are fixed by the tensors and lengths are read on the device, so both run inside
CUDA graphs. `TRITON_INTERPRET=1` runs them on CPU tensors (how the tests check them without a GPU).

Shapes: q `[B, H, hd]`; a layer's cache `[Hkv, blocks, block_size, hd]`; tables `[B, nblk]`
(block ids, the null block past a sequence's end); lengths `[B]` (keys per sequence, the new
position included) -> `[B, H, hd]`.
"""

from __future__ import annotations

import functools
import math

import torch


@functools.cache
def available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    # Only the model's shapes are compile-time constants: the table width and the split length
    # change with the batch's longest sequence and stay runtime values (no compile mid-serving).
    @triton.jit(do_not_specialize=["s_tb", "split_n"])
    def attend(q_ptr, k_ptr, v_ptr, table_ptr, len_ptr, out_ptr, m_ptr, l_ptr, scale,
               s_qb, s_qh, s_kh, s_kb, s_ks, s_tb, s_ob, s_oh, s_os, s_mb, s_mh, split_n,
               G: tl.constexpr, G_P2: tl.constexpr, HD: tl.constexpr, HD_P2: tl.constexpr, BS: tl.constexpr,
               BLOCK_N: tl.constexpr):
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        length = tl.load(len_ptr + b)
        lo = split * split_n
        hi = tl.minimum(length, lo + split_n)
        g = tl.arange(0, G_P2)
        d = tl.arange(0, HD_P2)
        gm, dm = g < G, d < HD
        heads = kvh * G + g
        q = tl.load(q_ptr + b * s_qb + heads[:, None] * s_qh + d[None, :], mask=gm[:, None] & dm[None, :],
                    other=0.0).to(tl.float32)  # [G, hd]
        m = tl.full([G_P2], float("-inf"), tl.float32)
        l = tl.zeros([G_P2], tl.float32)
        acc = tl.zeros([G_P2, HD_P2], tl.float32)
        for start in range(lo, hi, BLOCK_N):
            pos = start + tl.arange(0, BLOCK_N)
            valid = pos < hi
            block = tl.load(table_ptr + b * s_tb + pos // BS, mask=valid, other=0)
            where = kvh * s_kh + block[:, None] * s_kb + (pos % BS)[:, None] * s_ks + d[None, :]
            kv_mask = valid[:, None] & dm[None, :]
            k = tl.load(k_ptr + where, mask=kv_mask, other=0.0).to(tl.float32)  # [N, hd]
            v = tl.load(v_ptr + where, mask=kv_mask, other=0.0).to(tl.float32)
            s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # [G, N]
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m - m_new)
            l = l * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
            m = m_new
        out = out_ptr + b * s_ob + heads[:, None] * s_oh + split * s_os + d[None, :]
        if m_ptr is None:  # one split: normalise here
            tl.store(out, acc / l[:, None], mask=gm[:, None] & dm[None, :])
        else:  # a partial result: its running max and sum go beside it
            tl.store(out, acc, mask=gm[:, None] & dm[None, :])
            tl.store(m_ptr + b * s_mb + heads * s_mh + split, m, mask=gm)
            tl.store(l_ptr + b * s_mb + heads * s_mh + split, l, mask=gm)

    @triton.jit(do_not_specialize=["splits"])
    def merge(part_ptr, m_ptr, l_ptr, out_ptr, s_pb, s_ph, s_ps, s_mb, s_mh, s_ob, s_oh, splits,
              S_P2: tl.constexpr, HD: tl.constexpr, HD_P2: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        s = tl.arange(0, S_P2)
        d = tl.arange(0, HD_P2)
        sm, dm = s < splits, d < HD
        m = tl.load(m_ptr + b * s_mb + h * s_mh + s, mask=sm, other=float("-inf"))
        l = tl.load(l_ptr + b * s_mb + h * s_mh + s, mask=sm, other=0.0)
        part = tl.load(part_ptr + b * s_pb + h * s_ph + s[:, None] * s_ps + d[None, :],
                       mask=sm[:, None] & dm[None, :], other=0.0)
        top = tl.max(m, axis=0)
        w = tl.where(m == float("-inf"), 0.0, tl.exp(m - top))  # a split past the sequence's end: nothing
        out = tl.sum(part * w[:, None], axis=0) / tl.sum(l * w, axis=0)
        tl.store(out_ptr + b * s_ob + h * s_oh + d, out, mask=dm)

    return triton, attend, merge


def _p2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def default_splits(batch: int, num_kv_heads: int, max_len: int, *, programs: int = 132, block_n: int = 64) -> int:
    """Splits of each sequence's positions: enough (sequence, KV head, split) programs to fill a
    GPU of `programs` multiprocessors, each with at least 4 x `block_n` positions to walk. From
    shapes alone (the lengths stay on the device)."""
    if batch * num_kv_heads >= programs:
        return 1
    want = -(-programs // (batch * num_kv_heads))
    return max(1, min(want, max_len // (4 * block_n), MAX_SPLITS))


MAX_SPLITS = 32


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                 lengths: torch.Tensor, *, scale: float | None = None, splits: int = 1,
                 block_n: int = 64) -> torch.Tensor:
    """Decode attention over the paged cache (see the module docstring) -> `[B, H, hd]` in q's
    dtype. `splits` (at most MAX_SPLITS): how many programs share each sequence's positions."""
    triton, attend, merge = _kernels()
    b, h, hd = q.shape
    hkv, _, bs, _ = k_cache.shape
    g = h // hkv
    q = q.contiguous()
    scale = hd**-0.5 if scale is None else scale
    max_len = tables.shape[1] * bs
    splits = max(1, min(splits, MAX_SPLITS, -(-max_len // block_n)))
    split_n = -(-max_len // (splits * block_n)) * block_n  # whole BLOCK_N steps per split
    splits = -(-max_len // split_n)
    common = dict(G=g, G_P2=_p2(g), HD=hd, HD_P2=_p2(hd), BS=bs, BLOCK_N=block_n)
    kv = (k_cache.stride(0), k_cache.stride(1), k_cache.stride(2))
    if splits == 1:
        out = torch.empty(b, h, hd, dtype=torch.float32, device=q.device)
        attend[(b, hkv, 1)](q, k_cache, v_cache, tables, lengths, out, None, None, scale, q.stride(0), q.stride(1),
                            *kv, tables.stride(0), out.stride(0), out.stride(1), 0, 0, 0, split_n, **common)
        return out.to(q.dtype)
    part = torch.empty(b, h, splits, hd, dtype=torch.float32, device=q.device)
    m = torch.empty(b, h, splits, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    attend[(b, hkv, splits)](q, k_cache, v_cache, tables, lengths, part, m, l, scale, q.stride(0), q.stride(1), *kv,
                             tables.stride(0), part.stride(0), part.stride(1), part.stride(2), m.stride(0),
                             m.stride(1), split_n, **common)
    out = torch.empty(b, h, hd, dtype=torch.float32, device=q.device)
    merge[(b, h)](part, m, l, out, part.stride(0), part.stride(1), part.stride(2), m.stride(0), m.stride(1),
                  out.stride(0), out.stride(1), splits, S_P2=MAX_SPLITS, HD=hd, HD_P2=_p2(hd))
    return out.to(q.dtype)
