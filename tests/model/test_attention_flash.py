"""The flash attention backend (flash-attn's paged `flash_attn_with_kvcache`) without CUDA: what it
hands flash-attn is checked against `flash_attn_contract`, a plain-torch model of that function's
documented behaviour and argument checks, installed as the `flash_attn` module. The tiny
checkpoint decodes and serves through it to the CPU backend's greedy tokens, prompt chunks over
the cache included."""

from __future__ import annotations

import asyncio
import os
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from model import paged_attention_flash
from model.execution import choose
from model.loading import LoadOptions, load_model
from model.sampling import SamplingParams
from tests.model import flash_attn_contract
from tests.model.greedy import greedy_tokens

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the fallback test runs its kernels on the CPU


@pytest.fixture
def flash(monkeypatch):
    """The contract as `flash_attn`, half precision only, as the real kernel."""
    flash_attn_contract.install(monkeypatch)
    yield flash_attn_contract.calls
    flash_attn_contract.reset()


@pytest.fixture
def flash_f32(monkeypatch):
    """The contract letting float32 through: the tiny checkpoint's exact tokens on the CPU."""
    flash_attn_contract.install(monkeypatch, half_only=False)
    yield flash_attn_contract.calls
    flash_attn_contract.reset()


def _reference(q, k_layer, v_layer, tables, lengths):
    """Gather + SDPA: q `[B, T, H, hd]` over each row's keys, the causal mask aligned to the end."""
    b, t, h, hd = q.shape
    hkv, _, bs, _ = k_layer.shape
    out = torch.empty_like(q)
    for row in range(b):
        n = int(lengths[row])
        blocks = tables[row, :-(-n // bs)].long()
        k = k_layer[:, blocks].reshape(hkv, -1, hd)[:, :n]  # [Hkv, n, hd]
        v = v_layer[:, blocks].reshape(hkv, -1, hd)[:, :n]
        seen = torch.arange(n).view(1, n) <= torch.arange(n - t, n).view(t, 1)
        out[row] = F.scaled_dot_product_attention(q[row].transpose(0, 1), k, v, attn_mask=seen,
                                                  enable_gqa=h != hkv).transpose(0, 1)
    return out


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
@pytest.mark.parametrize("queries", [1, 5])
def test_attend_reads_the_blocks_where_they_lie(flash, heads, kv_heads, queries):
    """Ragged lengths across block edges, a shuffled pool with holes, the null block past each end."""
    g = torch.Generator().manual_seed(0)
    hd, bs, num_blocks = 16, 256, 12
    k_layer = torch.randn(kv_heads, num_blocks, bs, hd, generator=g)
    v_layer = torch.randn(kv_heads, num_blocks, bs, hd, generator=g)
    lengths = torch.tensor([5, 256, 257, 700], dtype=torch.int32)
    order = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()  # block 0 is the null block
    tables = torch.zeros(4, 3, dtype=torch.int32)
    for row, n in enumerate(lengths.tolist()):
        need = -(-n // bs)
        tables[row, :need] = torch.tensor([order.pop() for _ in range(need)])
    q = torch.randn(4, queries, heads, hd, generator=g)
    k_layer, v_layer, q = (x.to(torch.bfloat16) for x in (k_layer, v_layer, q))  # as flash-attn takes them
    got = paged_attention_flash.attend(q, k_layer, v_layer, tables, lengths).float()
    want = _reference(q.float(), k_layer.float(), v_layer.float(), tables, lengths)
    assert torch.allclose(got, want, atol=2e-2, rtol=2e-2), (got - want).abs().max()
    assert flash == [{"batch": 4, "queries": queries, "blocks": 3}]


def test_the_contract_refuses_what_flash_attn_refuses(flash):
    """The stand-in is only worth its checks: float32, int64 tables, blocks under 256 and tables
    past the pool fail as the real kernel fails (or as it would read foreign memory)."""
    k = torch.zeros(2, 4, 256, 16, dtype=torch.bfloat16)
    q = torch.zeros(1, 1, 2, 16, dtype=torch.bfloat16)
    table, length = torch.tensor([[1]], dtype=torch.int32), torch.tensor([3], dtype=torch.int32)
    paged_attention_flash.attend(q, k, k, table, length)
    for args, match in [((q.float(), k.float(), k.float(), table, length), "fp16 and bf16"),
                        ((q, k, k, table.long(), length), "int32"),
                        ((q, k[:, :, :128], k[:, :, :128], table, length), "divisible by 256"),
                        ((q, k, k, table + 9, length), "out of bounds"),
                        ((q, k, k, table, length + 300), "out of bounds")]:
        with pytest.raises(RuntimeError, match=match):
            paged_attention_flash.attend(*args)


def test_without_flash_attn_the_backend_is_refused(tiny_lm, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "flash_attn", None)  # an import of it fails
    paged_attention_flash._kernel.cache_clear()
    try:
        assert not paged_attention_flash.available()
        with pytest.raises(ValueError, match="flash-attn"):
            tiny_lm.model.llm.set_attention_backend("flash")
        assert choose("auto", torch.device("cuda"), torch.bfloat16).attention != "flash"
    finally:
        paged_attention_flash._kernel.cache_clear()


def test_auto_picks_flash_on_cuda_in_half_precision_only(flash, tiny_dir, monkeypatch):
    from model.checkpoint import CheckpointError

    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert choose("auto", cuda, torch.bfloat16).attention == "flash"
    assert choose("auto", cuda, torch.float16).attention == "flash"
    assert choose("auto", cuda, torch.float32).attention != "flash"
    assert choose("auto", cuda, torch.bfloat16, flash_allowed=False).attention != "flash"  # --attention sdpa
    assert choose("auto", torch.device("cpu"), torch.float32).attention == "cpu"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))  # a T4: flash-attn 2 refuses it
    assert choose("auto", cuda, torch.bfloat16).attention != "flash"
    with pytest.raises(CheckpointError, match="CUDA device and float16/bfloat16"):
        load_model(tiny_dir, LoadOptions(device="cpu", attention_backend="flash"))


def _flash_lm(tiny_dir):
    """The tiny checkpoint in float32 on the CPU with the flash backend (the loader would refuse it
    here: flash-attn proper needs CUDA)."""
    lm = load_model(tiny_dir, LoadOptions(device="cpu", attention_backend="sdpa"))
    lm.model.llm.set_attention_backend("flash")
    return lm


def test_the_flash_backend_decodes_the_tiny_checkpoint_as_the_cpu_backend(flash_f32, tiny_dir):
    prompts = [[1] + [(7 * i + 3 * j) % 200 + 5 for j in range(n)] for i, n in enumerate((4, 250, 300, 520))]
    got, block_size = greedy_tokens(_flash_lm(tiny_dir), prompts, steps=10, max_len=640, chunk=256)
    assert block_size == 256  # flash-attn's paged path takes multiples of 256
    want, _ = greedy_tokens(load_model(tiny_dir, LoadOptions(device="cpu", attention_backend="cpu")), prompts, steps=10,
                            max_len=640, chunk=256)
    assert got == want
    assert any(c["queries"] > 1 and c["blocks"] > 1 for c in flash_f32)  # a later chunk over the cache
    assert any(c["queries"] == 1 and c["batch"] == 4 for c in flash_f32)  # batched decode


def test_the_flash_backend_runs_the_tiny_checkpoint_in_bfloat16(flash, tiny_dir):
    """In half precision, as flash-attn takes it (the stand-in refusing float32): a prompt over two
    chunks and three decode steps give sdpa's logits within bf16's rounding."""
    lm = load_model(tiny_dir, LoadOptions(device="cpu", dtype="bfloat16", attention_backend="sdpa"))
    llm = lm.model.llm
    ids = torch.tensor([1] + [(5 * j) % 200 + 5 for j in range(299)] + [7, 9, 11])
    logits = {}
    for backend in ("flash", "sdpa"):
        llm.set_attention_backend(backend)
        cache = llm.new_cache(num_slots=1, max_len=512)
        emb = llm.embed(ids)
        llm.prefill(emb[:256], cache, slot=0, start=0)
        rows = [llm.logits(llm.prefill(emb[256:300], cache, slot=0, start=256))]
        for pos in range(300, len(ids)):
            rows.append(llm.logits(llm.decode(emb[pos:pos + 1], [pos], cache))[0])
        logits[backend] = torch.stack(rows)
    assert len(flash) == 2 * llm.cfg.num_hidden_layers + 3 * llm.cfg.num_hidden_layers  # every attention was flash's
    assert torch.allclose(logits["flash"], logits["sdpa"], atol=0.1, rtol=0.05), \
        (logits["flash"] - logits["sdpa"]).abs().max()


def test_the_flash_backend_serves_through_the_engine(flash_f32, tiny_dir):
    """Chunked prefill (the chunk grows to the 256-position block), prefix reuse and batched
    decode through the engine, to the cpu backend's tokens."""
    from server.engine.client import Engine
    from server.engine.runner import ModelRunner
    from server.engine.types import EngineRequest

    shared = [1] + [(3 * j) % 200 + 5 for j in range(270)]
    prompts = [shared + [(5 * i + j) % 200 + 5 for j in range(10 + 20 * i)] for i in range(3)]

    def serve(lm):
        runner = ModelRunner(lm, max_batch_size=4, max_model_len=640)
        engine = Engine(runner, prefill_chunk=64)
        with engine:
            async def main():
                params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
                streams = [engine.submit(EngineRequest(f"r{i}", p, [], params, len(p))) for i, p in enumerate(prompts)]

                async def collect(stream):
                    return [t async for ev in stream for t in ev.token_ids]

                return await asyncio.gather(*(collect(s) for s in streams))

            return asyncio.run(main()), runner.block_size, engine.prefill_chunk

    got, block_size, chunk = serve(_flash_lm(tiny_dir))
    assert (block_size, chunk) == (256, 256)
    want, _, _ = serve(load_model(tiny_dir, LoadOptions(device="cpu", attention_backend="cpu")))
    assert got == want


@pytest.mark.parametrize("triton_works", [True, False], ids=["to-triton", "to-sdpa"])
def test_a_flash_kernel_failing_its_warm_up_falls_back_when_chosen_by_auto(flash_f32, tiny_dir, monkeypatch,
                                                                           triton_works):
    """flash -> triton -> sdpa: the next backend whose kernel passes its warm-up."""
    from model import paged_attention_triton
    from server.engine.runner import ModelRunner
    from tests.tools import missing_tool

    if not paged_attention_triton.available():
        missing_tool("triton is not installed (pip install triton)")
    lm = _flash_lm(tiny_dir)
    lm.model.llm.execution = replace(lm.model.llm.execution, auto=True)

    def broken(*a, **k):
        raise RuntimeError("simulated: no kernel image for this device")

    monkeypatch.setattr(flash_attn_contract, "flash_attn_with_kvcache", broken)
    flash_attn_contract.install(monkeypatch, half_only=False)
    if not triton_works:
        monkeypatch.setattr(paged_attention_triton, "paged_decode", broken)
    runner = ModelRunner(lm, max_batch_size=2, max_model_len=128)
    runner.warm_up()
    assert lm.model.llm.attention_backend == ("triton" if triton_works else "sdpa")
    lm.model.llm.set_attention_backend("flash")
    lm.model.llm.execution = replace(lm.model.llm.execution, auto=False)
    with pytest.raises(RuntimeError, match="simulated"):
        ModelRunner(lm, max_batch_size=2, max_model_len=128).warm_up()
