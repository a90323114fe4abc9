"""The Triton paged decode kernel against the SDPA reference, run by Triton's interpreter on CPU
tensors (`TRITON_INTERPRET=1`): random caches, GQA ratios, ragged lengths 1..4,096, block tables
with holes and the null block, one split and several (flash-decoding)."""

from __future__ import annotations

import os
import random

import pytest
import torch
import torch.nn.functional as F

from tests.tools import missing_tool

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are built (only a GPU run unsets it)


@pytest.fixture(scope="module")
def kernel():
    from model import paged_attention_triton as pat

    if not pat.available():
        missing_tool("triton is not installed (pip install triton)")
    return pat


def _case(seed: int, batch: int, heads: int, kv_heads: int, hd: int, lengths: list[int], bs: int = 16,
          dtype=torch.float32):
    """A pool whose blocks are handed out in shuffled order (holes between a sequence's blocks),
    every table padded with the null block, and junk in the unused blocks."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    need = [-(-n // bs) for n in lengths]
    num_blocks = 1 + sum(need) + 7  # the null block and a few that nobody owns
    ids = list(range(1, num_blocks))
    rng.shuffle(ids)
    width = max(need) + rng.randrange(0, 3)  # tables wider than the longest sequence
    tables = torch.zeros(batch, width, dtype=torch.int32)
    for i, n in enumerate(need):
        tables[i, :n] = torch.tensor([ids.pop() for _ in range(n)])
    k = torch.randn(kv_heads, num_blocks, bs, hd, generator=g).to(dtype)
    v = torch.randn(kv_heads, num_blocks, bs, hd, generator=g).to(dtype)
    q = torch.randn(batch, heads, hd, generator=g).to(dtype)
    return q, k, v, tables, torch.tensor(lengths, dtype=torch.int32)


def _reference(q, k, v, tables, lengths):
    """Gather each sequence's blocks, then SDPA with its padding masked (float64)."""
    b, h, hd = q.shape
    hkv, _, bs, _ = k.shape
    span = tables.shape[1] * bs
    keys = k[:, tables.long()].reshape(hkv, b, span, hd).transpose(0, 1).double()  # [B, Hkv, span, hd]
    values = v[:, tables.long()].reshape(hkv, b, span, hd).transpose(0, 1).double()
    mask = (torch.arange(span).view(1, -1) < lengths.view(-1, 1)).view(b, 1, 1, span)
    out = F.scaled_dot_product_attention(q.double().unsqueeze(2), keys, values, attn_mask=mask, enable_gqa=hkv != h)
    return out[:, :, 0]


SHAPES = [  # batch, heads, kv heads, head dim, lengths
    (1, 4, 4, 16, [1]),
    (1, 8, 2, 64, [17]),
    (3, 4, 2, 16, [5, 16, 33]),
    (4, 32, 8, 128, [1, 100, 257, 1000]),
    (2, 12, 12, 64, [4096, 31]),  # MHA, the longest context
    (5, 6, 1, 32, [15, 16, 17, 48, 2]),  # MQA
    (2, 28, 4, 80, [300, 77]),  # a head dim that is not a power of two, GQA 7
    (8, 4, 2, 16, [1 + 97 * i for i in range(8)]),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"b{s[0]}-h{s[1]}-kv{s[2]}-d{s[3]}-max{max(s[4])}")
@pytest.mark.parametrize("splits", [1, 4])
def test_the_kernel_equals_the_sdpa_reference(kernel, shape, splits):
    batch, heads, kv_heads, hd, lengths = shape
    q, k, v, tables, lens = _case(sum(lengths) + splits, batch, heads, kv_heads, hd, lengths)
    got = kernel.paged_decode(q, k, v, tables, lens, splits=splits)
    assert got.shape == (batch, heads, hd) and got.dtype == q.dtype
    assert torch.allclose(got.double(), _reference(q, k, v, tables, lens), atol=2e-5, rtol=1e-4), \
        (got.double() - _reference(q, k, v, tables, lens)).abs().max()


def test_splits_past_a_short_sequence_contribute_nothing(kernel):
    """A batch of a 4,000-position sequence and a 3-position one, 16 splits: most of the short
    one's splits hold no key at all."""
    q, k, v, tables, lens = _case(7, 2, 8, 2, 32, [4000, 3])
    got = kernel.paged_decode(q, k, v, tables, lens, splits=16)
    assert torch.isfinite(got).all()
    assert torch.allclose(got.double(), _reference(q, k, v, tables, lens), atol=2e-5, rtol=1e-4)


def test_half_precision_caches(kernel):
    q, k, v, tables, lens = _case(3, 3, 8, 4, 64, [50, 129, 7], dtype=torch.bfloat16)
    got = kernel.paged_decode(q, k, v, tables, lens, splits=2)
    assert got.dtype == torch.bfloat16
    assert torch.allclose(got.double(), _reference(q, k, v, tables, lens), atol=2e-2, rtol=2e-2)


def test_keys_outside_a_sequence_are_never_read(kernel):
    """Blocks the table does not name, and positions past the length in the last block, may hold
    anything (NaN here): the result is the same."""
    q, k, v, tables, lens = _case(11, 3, 4, 2, 16, [20, 5, 40])
    clean = kernel.paged_decode(q, k, v, tables, lens, splits=2)
    named = {(int(b), p) for i in range(3) for p in range(int(lens[i])) for b in [tables[i, p // 16]]}
    dirty_k, dirty_v = k.clone(), v.clone()
    for blk in range(k.shape[1]):
        for off in range(16):
            if not any((blk, p) in named for p in [off + 16 * c for c in range(tables.shape[1])]):
                dirty_k[:, blk, off] = float("nan")
                dirty_v[:, blk, off] = float("nan")
    assert torch.equal(kernel.paged_decode(q, dirty_k, dirty_v, tables, lens, splits=2), clean)


WRITE_SHAPES = [(1, 4, 4, 16, [1]), (4, 8, 2, 32, [1, 16, 17, 300]), (3, 28, 4, 80, [64, 65, 513]),
                (5, 6, 1, 32, [15, 16, 17, 48, 2])]


@pytest.mark.parametrize("shape", WRITE_SHAPES, ids=lambda s: f"b{s[0]}-h{s[1]}-kv{s[2]}-d{s[3]}-max{max(s[4])}")
@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernel_writes_the_new_token_and_attends_to_it(kernel, shape, splits, dtype):
    """With k_new/v_new the kernel stores them at each row's newest position (that slot holds NaN
    before: it must never be read) and attends as if they had been written first. They arrive as
    slices of one projection output, with strides of their own, as the model hands them over."""
    batch, heads, kv_heads, hd, lengths = shape
    q, k, v, tables, lens = _case(len(lengths) + splits, batch, heads, kv_heads, hd, lengths, dtype=dtype)
    g = torch.Generator().manual_seed(5)
    proj = torch.randn(batch, 3 * kv_heads + 1, hd, generator=g).to(dtype)  # [B, k heads | v heads | other, hd]
    k_new, v_new = proj[:, :kv_heads], proj[:, 2 * kv_heads:3 * kv_heads]
    want_k, want_v = k.clone(), v.clone()
    for row, n in enumerate(lengths):
        block, off = int(tables[row, (n - 1) // 16]), (n - 1) % 16
        k[:, block, off] = float("nan")
        v[:, block, off] = float("nan")
        want_k[:, block, off] = k_new[row]
        want_v[:, block, off] = v_new[row]
    got = kernel.paged_decode(q, k, v, tables, lens, splits=splits, k_new=k_new, v_new=v_new)
    assert torch.equal(k, want_k) and torch.equal(v, want_v)  # the new K/V written, nothing else touched
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    want = _reference(q, want_k, want_v, tables, lens)
    assert torch.allclose(got.double(), want, atol=tol, rtol=tol), (got.double() - want).abs().max()


def test_new_keys_in_another_dtype_are_refused(kernel):
    q, k, v, tables, lens = _case(1, 1, 4, 4, 16, [5])
    with pytest.raises(ValueError, match="cache's dtype"):
        kernel.paged_decode(q, k, v, tables, lens, k_new=torch.zeros(1, 4, 16, dtype=torch.float64),
                            v_new=torch.zeros(1, 4, 16, dtype=torch.float64))


def test_default_splits_fill_the_device_only_where_the_batch_does_not():
    from model.paged_attention_triton import default_splits

    assert default_splits(64, 8, 2048) == 1  # 512 programs already
    assert default_splits(1, 8, 8192) == 17  # 132 multiprocessors / 8 KV heads
    assert default_splits(1, 8, 256) == 1  # too short to split
