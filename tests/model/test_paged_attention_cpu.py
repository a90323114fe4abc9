"""The CPU decode kernel (RoPE, cache write and attention reading the paged cache in place)
against the eager ops it replaces: RoPE, the cache write, the gather and two matmuls."""

import pytest
import torch

from model import paged_attention_cpu
from model.kv_cache import KVCache
from model.llm import bucket_bias, key_span, paged_decode_attention
from model.pointwise import rope

H, HKV, HD, BS = 8, 2, 16, 4


def _setup(lengths, seed=0):
    """A cache with random contents, scattered tables, the new rows' qkv `[B, H + 2 Hkv, hd]`
    before RoPE, and cos / sin `[B, hd]` for their positions."""
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
    qkv = torch.randn(len(lengths), H + 2 * HKV, HD, generator=g)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, HD, 2).float() / HD))
    freqs = torch.outer(torch.tensor([n - 1 for n in lengths], dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return cache, tables, qkv, emb.cos(), emb.sin()


def _eager(cache, layer, tables, lengths, qkv, cos, sin):
    q, k, v = qkv[:, :H], qkv[:, H:H + HKV], qkv[:, H + HKV:]
    q, k = rope(q, cos[:, None], sin[:, None]), rope(k, cos[:, None], sin[:, None])
    span = key_span(lengths, BS)
    table = cache.tables(tables, span)
    pos = torch.tensor([n - 1 for n in lengths])
    cache.write(layer, *cache.where(table, pos), k.transpose(0, 1), v.transpose(0, 1))
    keys, values = cache.gather(layer, table)
    bias = bucket_bias(lengths, span, torch.float32, "cpu")
    return paged_decode_attention(q.unsqueeze(2), keys, values, bias).reshape(len(lengths), H * HD)


def _kernel(cache, layer, tables, lengths, qkv, cos, sin):
    table = cache.tables(tables, -(-max(lengths) // BS) * BS)
    pos = torch.tensor([n - 1 for n in lengths])
    step = paged_attention_cpu.DecodeStep(cos, sin, table, pos)
    return paged_attention_cpu.decode_attention(qkv, step, *cache.numpy_layer(layer))


def test_the_kernel_is_available():
    assert paged_attention_cpu.available()  # numba is a dependency: otherwise the tests below test nothing


@pytest.mark.parametrize("lengths", [[1], [4], [5], [37, 1, 12, 64, 9]], ids=str)
def test_matches_the_eager_ops_and_writes_the_same_keys_and_values(lengths):
    a, b = _setup(lengths), _setup(lengths)
    before = b[0].k.clone(), b[0].v.clone()
    expect = _eager(a[0], 1, a[1], lengths, *a[2:])
    got = _kernel(b[0], 1, b[1], lengths, *b[2:])
    assert torch.allclose(got, expect, atol=1e-5, rtol=1e-5)
    # RoPE in the reference's arithmetic: the cache holds the very bits the eager ops write
    assert torch.equal(a[0].k, b[0].k) and torch.equal(a[0].v, b[0].v)
    assert torch.equal(b[0].k[0], before[0][0]) and torch.equal(b[0].v[0], before[1][0])  # other layer untouched
    assert not torch.equal(b[0].k[1], before[0][1])  # the new keys went in


@pytest.mark.parametrize("bad", ["block id past the cache", "negative block id", "position past the table",
                                 "negative position"])
def test_a_bad_step_raises_instead_of_writing_outside_the_cache(bad):
    """The compiled loop has no bounds checks, so the step is checked before it runs: a bad step
    fails as an error the executor can pin on its request, and the cache is left as it was."""
    lengths = [9, 5]
    cache, tables, qkv, cos, sin = _setup(lengths)
    table = cache.tables(tables, 12)
    pos = torch.tensor([n - 1 for n in lengths])
    if bad == "block id past the cache":
        table[1, 0] = cache.k.shape[2]
    elif bad == "negative block id":
        table[0, 2] = -1
    elif bad == "position past the table":
        pos[0] = 12
    else:
        pos[1] = -1
    before = cache.k.clone(), cache.v.clone()
    with pytest.raises(ValueError):  # more rows than the step describes
        paged_attention_cpu.decode_attention(torch.cat([qkv, qkv]), paged_attention_cpu.DecodeStep(cos, sin, table, pos),
                                             *cache.numpy_layer(0))
    with pytest.raises(IndexError):
        paged_attention_cpu.decode_attention(qkv, paged_attention_cpu.DecodeStep(cos, sin, table, pos),
                                             *cache.numpy_layer(0))
    assert torch.equal(cache.k, before[0]) and torch.equal(cache.v, before[1])


def test_a_row_does_not_depend_on_the_other_rows():
    lengths = [50, 3, 17, 33, 8, 61]
    cache, tables, qkv, cos, sin = _setup(lengths)
    together = _kernel(cache, 0, tables, lengths, qkv, cos, sin)
    for i in range(len(lengths)):
        alone, *_ = _setup(lengths)  # fresh contents: a stale write must not be what is read
        got = _kernel(alone, 0, [tables[i]], [lengths[i]], qkv[i:i + 1], cos[i:i + 1], sin[i:i + 1])
        assert torch.equal(got[0], together[i])


def _decode_after_prefill(llm, embeds, lengths, max_len):
    """Prefill row i's first lengths[i] embeddings `[B, T, D]`, then decode the last one for every
    row -> (logits `[B, vocab]`, the cache)."""
    cache = llm.new_cache(num_slots=len(lengths), max_len=max_len, dtype=torch.float32, device="cpu")
    for slot, n in enumerate(lengths):
        llm.prefill(embeds[slot, :n], cache, slot=slot, start=0)
    return llm.logits(llm.decode(embeds[:, -1], lengths, cache)), cache


def test_the_model_decodes_alike_with_and_without_the_kernel(tiny_lm, monkeypatch):
    llm = tiny_lm.model.llm
    assert llm.attention_backend == "cpu"  # the default on the CPU in float32
    torch.manual_seed(0)
    embeds = torch.randn(3, 90, tiny_lm.cfg.hidden_size)
    lengths = [20, 70, 45]
    outs, caches = [], []
    for inplace in (True, False):
        monkeypatch.setattr(llm, "execution", llm.execution.with_attention("cpu" if inplace else "sdpa"))
        logits, cache = _decode_after_prefill(llm, embeds, lengths, max_len=96)
        outs.append(logits)
        caches.append(cache)
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    # the first layer's new keys went through the same RoPE: the same bits
    assert torch.equal(caches[0].k[0], caches[1].k[0]) and torch.equal(caches[0].v[0], caches[1].v[0])


def test_without_numba_the_model_keeps_the_gather_path(tiny_dir, tiny_lm, monkeypatch):
    from model import cpu_decode
    from model.loading import LoadOptions, load_model

    monkeypatch.setattr(paged_attention_cpu, "numba", None)  # a broken install: the model still serves
    lm = load_model(tiny_dir, LoadOptions(device="cpu"))
    llm = lm.model.llm
    assert not paged_attention_cpu.available() and llm.attention_backend == "sdpa" and not cpu_decode.ready(llm)
    torch.manual_seed(0)
    embeds = torch.randn(2, 40, tiny_lm.cfg.hidden_size)
    outs = [_decode_after_prefill(m, embeds, [30, 17], max_len=48)[0] for m in (tiny_lm.model.llm, llm)]
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
