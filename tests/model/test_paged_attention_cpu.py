"""The CPU decode-attention kernel that reads the paged cache in place, against the eager
gather-and-matmul path it replaces."""

import pytest
import torch

from model import paged_attention_cpu
from model.kv_cache import KVCache
from model.llm import bucket_bias, key_span, paged_decode_attention

H, HKV, HD, BS = 8, 2, 16, 4


def _setup(lengths, seed=0):
    """A cache with random contents, scattered tables and the new rows' q, k, v."""
    g = torch.Generator().manual_seed(seed)
    per = [-(-n // BS) for n in lengths]
    cache = KVCache(num_layers=2, num_blocks=1 + sum(per) + 3, block_size=BS, num_kv_heads=HKV, head_dim=HD,
                    dtype=torch.float32, device="cpu")
    cache.k.normal_(generator=g)
    cache.v.normal_(generator=g)
    order = (torch.randperm(sum(per), generator=g) + 1).tolist()
    tables, at = [], 0
    for n in per:
        tables.append(order[at:at + n])
        at += n
    b = len(lengths)
    q, k, v = (torch.randn(b, n, HD, generator=g) for n in (H, HKV, HKV))
    return cache, tables, q, k, v


def _eager(cache, layer, tables, lengths, q, k, v):
    span = key_span(lengths, BS)
    table = cache.tables(tables, span)
    pos = torch.tensor([n - 1 for n in lengths])
    cache.write(layer, *cache.where(table, pos), k.transpose(0, 1), v.transpose(0, 1))
    keys, values = cache.gather(layer, table)
    bias = bucket_bias(lengths, span, torch.float32, "cpu")
    return paged_decode_attention(q.unsqueeze(2), keys, values, bias).view(len(lengths), H, HD)


def _inplace(cache, layer, tables, lengths, q, k, v):
    table = cache.tables(tables, -(-max(lengths) // BS) * BS)
    pos = torch.tensor([n - 1 for n in lengths])
    return paged_attention_cpu.paged_decode_attention_inplace(q, k, v, cache.k[layer], cache.v[layer], table, pos)


def test_the_kernel_is_available():
    assert paged_attention_cpu.available()  # numba is a dependency: otherwise the tests below test nothing


@pytest.mark.parametrize("lengths", [[1], [4], [5], [37, 1, 12, 64, 9]], ids=str)
def test_matches_the_gather_path_and_writes_the_new_key_and_value(lengths):
    a = _setup(lengths)
    b = _setup(lengths)
    expect = _eager(a[0], 1, *a[1:2], lengths, *a[2:])
    got = _inplace(b[0], 1, *b[1:2], lengths, *b[2:])
    assert torch.allclose(got, expect, atol=1e-5, rtol=1e-5)
    assert torch.equal(a[0].k, b[0].k) and torch.equal(a[0].v, b[0].v)  # same writes, same places
    assert b[0].k[0].abs().sum() > 0 and torch.equal(a[0].k[0], b[0].k[0])  # the other layer untouched


def test_a_row_does_not_depend_on_the_other_rows():
    lengths = [50, 3, 17, 33, 8, 61]
    cache, tables, q, k, v = _setup(lengths)
    together = _inplace(cache, 0, tables, lengths, q, k, v)
    for i in range(len(lengths)):
        alone, *_ = _setup(lengths)  # fresh contents: the write above must not be what is read
        got = _inplace(alone, 0, [tables[i]], [lengths[i]], q[i:i + 1], k[i:i + 1], v[i:i + 1])
        assert torch.equal(got[0], together[i])


def test_the_model_decodes_alike_with_and_without_the_kernel(tiny_lm, monkeypatch):
    llm = tiny_lm.model.llm
    assert llm.inplace_decode_attention  # on by default on the CPU in float32
    torch.manual_seed(0)
    embeds = torch.randn(3, 90, tiny_lm.cfg.hidden_size)
    lengths = [20, 70, 45]
    outs = []
    for inplace in (True, False):
        monkeypatch.setattr(llm, "inplace_decode_attention", inplace)
        cache = llm.new_cache(num_slots=3, max_len=96, dtype=torch.float32, device="cpu")
        for slot, n in enumerate(lengths):
            llm.prefill(embeds[slot, :n], cache, slot=slot, start=0)
        outs.append(llm.logits(llm.decode(embeds[:, 89], lengths, cache)))
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
