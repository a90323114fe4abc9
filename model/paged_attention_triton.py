"""Paged decode attention in Triton: each sequence's keys and values are read where they lie in the
block pool, through its block table (no gather into a padded copy, no mask tensor).

One program per (sequence, KV head) handles the query heads that share that KV head (GQA), walking
the sequence's positions `BLOCK_N` at a time with an online softmax. The split-K variant
(flash-decoding) gives each program a range of positions and merges the partial results in a
second kernel: at small batches and long contexts a (sequence, KV head) grid alone leaves most of a
GPU idle. Shapes are fixed by the tensors and lengths are read on the device, so both run inside
CUDA graphs. `TRITON_INTERPRET=1` runs them on CPU tensors (how the tests check them without a GPU).

With the new token's K/V (`k_new`, `v_new`) the kernel also stores them at each row's newest
position, so a decode step needs no separate cache write: the program whose split holds that
position writes them and attends to them from registers, and no program reads that position from
memory.

Shapes: q `[B, H, hd]`; a layer's cache `[Hkv, blocks, block_size, hd]`; tables `[B, nblk]`
(block ids, the null block past a sequence's end); lengths `[B]` (keys per sequence, the new
position included); k_new, v_new `[B, Hkv, hd]` -> `[B, H, hd]`.
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
    def attend(q_ptr, k_ptr, v_ptr, table_ptr, len_ptr, out_ptr, m_ptr, l_ptr, knew_ptr, vnew_ptr, scale,
               s_qb, s_qh, s_kh, s_kb, s_ks, s_tb, s_ob, s_oh, s_os, s_mb, s_mh, s_knb, s_knh, s_vnb, s_vnh, split_n,
               G: tl.constexpr, G_P2: tl.constexpr, HD: tl.constexpr, HD_P2: tl.constexpr, BS: tl.constexpr,
               BLOCK_N: tl.constexpr, WRITE: tl.constexpr):
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
        # WRITE: the new token's K/V (position length - 1) come in registers. The one program whose
        # split holds that position stores them into the cache and attends to them from registers;
        # no program reads that position from memory, so no program can race the store.
        newest = length - 1
        mine = (lo <= newest) & (newest < hi)
        if WRITE:
            store = dm & (tl.zeros([HD_P2], tl.int32) + mine.to(tl.int32) > 0)  # a mask as wide as the row
            hi = tl.where(mine, newest, hi)
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
        if WRITE:
            k_new = tl.load(knew_ptr + b * s_knb + kvh * s_knh + d, mask=dm, other=0.0)  # [hd], the cache's dtype
            v_new = tl.load(vnew_ptr + b * s_vnb + kvh * s_vnh + d, mask=dm, other=0.0)
            block = tl.load(table_ptr + b * s_tb + newest // BS)
            where = kvh * s_kh + block * s_kb + (newest % BS) * s_ks + d
            tl.store(k_ptr + where, k_new, mask=store)
            tl.store(v_ptr + where, v_new, mask=store)
            # the key as the cache holds it (rounded to its dtype), as a later step will read it
            s_new = tl.sum(q * k_new.to(tl.float32)[None, :], axis=1) * scale  # [G]
            m_new = tl.maximum(m, s_new)
            p_new = tl.exp(s_new - m_new)
            alpha = tl.exp(m - m_new)
            m = tl.where(mine, m_new, m)  # other splits keep theirs (no NaN from -inf - -inf)
            l = tl.where(mine, l * alpha + p_new, l)
            acc = tl.where(mine, acc * alpha[:, None] + p_new[:, None] * v_new.to(tl.float32)[None, :], acc)
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
                 block_n: int = 64, k_new: torch.Tensor | None = None,
                 v_new: torch.Tensor | None = None) -> torch.Tensor:
    """Decode attention over the paged cache (see the module docstring) -> `[B, H, hd]` in q's
    dtype. `splits` (at most MAX_SPLITS): how many programs share each sequence's positions.
    With `k_new`, `v_new` `[B, Hkv, hd]` (the cache's dtype, last dimension contiguous) the kernel
    also writes them at each row's newest position (lengths - 1): no separate cache write."""
    triton, attend, merge = _kernels()
    b, h, hd = q.shape
    hkv, _, bs, _ = k_cache.shape
    g = h // hkv
    q = q.contiguous()
    write = k_new is not None
    if write:
        if v_new is None or k_new.shape != (b, hkv, hd) or v_new.shape != k_new.shape \
                or k_new.stride(-1) != 1 or v_new.stride(-1) != 1 or k_new.dtype != k_cache.dtype \
                or v_new.dtype != v_cache.dtype:
            raise ValueError("k_new and v_new must be [B, Hkv, hd], in the cache's dtype, last dimension contiguous")
        new = (k_new, v_new, k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1))
    else:
        new = (None, None, 0, 0, 0, 0)
    scale = hd**-0.5 if scale is None else scale
    max_len = tables.shape[1] * bs
    splits = max(1, min(splits, MAX_SPLITS, -(-max_len // block_n)))
    split_n = -(-max_len // (splits * block_n)) * block_n  # whole BLOCK_N steps per split
    splits = -(-max_len // split_n)
    common = dict(G=g, G_P2=_p2(g), HD=hd, HD_P2=_p2(hd), BS=bs, BLOCK_N=block_n, WRITE=write)
    kv = (k_cache.stride(0), k_cache.stride(1), k_cache.stride(2))
    if splits == 1:
        out = torch.empty(b, h, hd, dtype=torch.float32, device=q.device)
        attend[(b, hkv, 1)](q, k_cache, v_cache, tables, lengths, out, None, None, *new[:2], scale, q.stride(0),
                            q.stride(1), *kv, tables.stride(0), out.stride(0), out.stride(1), 0, 0, 0, *new[2:],
                            split_n, **common)
        return out.to(q.dtype)
    part = torch.empty(b, h, splits, hd, dtype=torch.float32, device=q.device)
    m = torch.empty(b, h, splits, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    attend[(b, hkv, splits)](q, k_cache, v_cache, tables, lengths, part, m, l, *new[:2], scale, q.stride(0),
                             q.stride(1), *kv, tables.stride(0), part.stride(0), part.stride(1), part.stride(2),
                             m.stride(0), m.stride(1), *new[2:], split_n, **common)
    out = torch.empty(b, h, hd, dtype=torch.float32, device=q.device)
    merge[(b, h)](part, m, l, out, part.stride(0), part.stride(1), part.stride(2), m.stride(0), m.stride(1),
                  out.stride(0), out.stride(1), splits, S_P2=MAX_SPLITS, HD=hd, HD_P2=_p2(hd))
    return out.to(q.dtype)
