"""GPU path (skipped without CUDA): the tiny checkpoint on the device, batched engine decode."""

import pytest
import torch

from model.generation import generate
from model.loading import LoadOptions, load_model
from model.sampling import SamplingParams
from model.templates import Message

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tiny_checkpoint_generates_on_cuda(tiny_dir, tiny_lm, ironing, dtype):
    lm = load_model(tiny_dir, LoadOptions(device="cuda", dtype=dtype))
    assert not lm.model.llm.batch_invariant and lm.model.llm.lm_head.weight.is_cuda
    msgs = [Message("user", "What is unusual about this image?", 1)]
    gpu = generate(lm, msgs, [ironing], SamplingParams(max_tokens=6, temperature=0))
    cpu = generate(tiny_lm, msgs, [ironing], SamplingParams(max_tokens=6, temperature=0))
    assert gpu.images[0].grid == cpu.images[0].grid and len(gpu.token_ids) == 6
    if dtype == "float32":  # same selection and prompt in full precision
        assert gpu.images[0].local_kept == cpu.images[0].local_kept and gpu.prompt_tokens == cpu.prompt_tokens


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager-kernels", "compiled-kernels"])
def test_decode_graphs_replay_the_eager_step(tiny_dir, compiled, backend, monkeypatch):
    """Captured graphs decode what eager decode does (float32), per batch bucket and key span, and
    their padding rows write only to the null block; also with compiled pointwise kernels, and with
    the graphs attending through the Triton kernel (against eager gather + SDPA)."""
    from model.decode_graphs import DecodeGraphs

    lm = load_model(tiny_dir, LoadOptions(device="cuda", dtype="float32", attention_backend=backend))
    llm, hidden = lm.model.llm, lm.cfg.hidden_size
    real_call = DecodeGraphs.__call__

    def graph_call(self, *a):  # graphs through `backend`, the eager reference through sdpa
        llm.set_attention_backend(backend)
        try:
            return real_call(self, *a)
        finally:
            llm.set_attention_backend("sdpa")

    monkeypatch.setattr(DecodeGraphs, "__call__", graph_call)
    llm.set_attention_backend("sdpa")
    llm.compile_pointwise(compiled)
    torch.manual_seed(0)
    lengths = [30, 100, 170]
    embeds = torch.randn(3, 170, hidden, device="cuda")
    caches = [llm.new_cache(num_slots=8, max_len=400) for _ in range(2)]
    for cache in caches:
        for slot, n in enumerate(lengths):
            llm.prefill(embeds[slot, :n], cache, slot=slot, start=0)
    eager_cache, graph_cache = caches
    tables = [graph_cache.slot_table(i) for i in range(3)]
    others = [b for i in range(3, 8) for b in graph_cache.slot_table(i)]
    bystander = graph_cache.k[:, :, others].clone()
    graphs = DecodeGraphs(llm, graph_cache, max_batch=8, max_len=400, span_block=64)
    assert graphs.use_graphs
    ids, positions = [5, 6, 7], list(lengths)
    for _ in range(70):  # crosses a span bucket: a second graph is captured on the way
        eager = llm.logits(llm.decode(llm.embed(torch.tensor(ids, device="cuda")), positions, eager_cache))
        replayed = graphs(ids, positions, tables)
        assert torch.allclose(replayed, eager, atol=1e-4), (replayed - eager).abs().max()
        ids, positions = eager.argmax(-1).tolist(), [p + 1 for p in positions]
    solo = graphs([ids[0]], [positions[0]], tables[:1])  # batch 1: another bucket
    eager_solo = llm.logits(llm.decode(llm.embed(torch.tensor(ids[:1], device="cuda")), positions[:1], eager_cache))
    assert torch.allclose(solo, eager_solo, atol=1e-4)
    assert graphs.num_graphs >= 3
    assert torch.equal(graph_cache.k[:, :, others], bystander)


@pytest.mark.parametrize("write", [False, True], ids=["read", "write-new"])
@pytest.mark.parametrize("splits", [1, 8])
def test_the_triton_kernel_on_the_device_equals_sdpa(splits, write):
    """Against SDPA; with `write` the kernel also stores the new K/V (the slot holds NaN before)."""
    import torch.nn.functional as F

    from model.paged_attention_triton import paged_decode

    g = torch.Generator(device="cuda").manual_seed(0)
    b, h, hkv, hd, bs = 4, 32, 8, 128, 16
    lengths = torch.tensor([1, 700, 2048, 4000], device="cuda", dtype=torch.int32)
    nblk = 250
    perm = torch.randperm(b * nblk, device="cuda", generator=g) + 1
    tables = perm.view(b, nblk).int()
    k = torch.randn(hkv, b * nblk + 1, bs, hd, device="cuda", generator=g, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(b, h, hd, device="cuda", generator=g, dtype=torch.bfloat16)
    new = {}
    if write:
        k_new = torch.randn(b, hkv, hd, device="cuda", generator=g, dtype=torch.bfloat16)
        v_new = torch.randn_like(k_new)
        rows = torch.arange(b, device="cuda")
        blocks, offsets = tables[rows, (lengths - 1) // bs].long(), ((lengths - 1) % bs).long()
        k[:, blocks, offsets] = float("nan")
        v[:, blocks, offsets] = float("nan")
        new = dict(k_new=k_new, v_new=v_new)
    got = paged_decode(q, k, v, tables, lengths, splits=splits, **new).float()
    if write:
        assert torch.equal(k[:, blocks, offsets], k_new.transpose(0, 1))
        assert torch.equal(v[:, blocks, offsets], v_new.transpose(0, 1))
    keys = k[:, tables.long()].reshape(hkv, b, nblk * bs, hd).transpose(0, 1).float()
    values = v[:, tables.long()].reshape(hkv, b, nblk * bs, hd).transpose(0, 1).float()
    mask = (torch.arange(nblk * bs, device="cuda").view(1, -1) < lengths.view(-1, 1)).view(b, 1, 1, -1)
    ref = F.scaled_dot_product_attention(q.float().unsqueeze(2), keys, values, attn_mask=mask, enable_gqa=True)[:, :, 0]
    assert torch.allclose(got, ref, atol=2e-2, rtol=2e-2), (got - ref).abs().max()


@pytest.mark.parametrize("queries", [1, 7])
def test_flash_attn_s_paged_path_on_the_device_equals_sdpa(queries):
    """The real `flash_attn_with_kvcache` through our permuted cache view (skipped without flash-attn)."""
    import torch.nn.functional as F

    pytest.importorskip("flash_attn")
    from model.paged_attention_flash import attend

    g = torch.Generator(device="cuda").manual_seed(0)
    b, h, hkv, hd, bs, nblk = 3, 32, 8, 128, 256, 16
    lengths = torch.tensor([7, 1000, 4000], device="cuda", dtype=torch.int32)
    tables = (torch.randperm(b * nblk, device="cuda", generator=g) + 1).view(b, nblk).int()
    k = torch.randn(hkv, b * nblk + 1, bs, hd, device="cuda", generator=g, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(b, queries, h, hd, device="cuda", generator=g, dtype=torch.bfloat16)
    got = attend(q, k, v, tables, lengths).float()
    keys = k[:, tables.long()].reshape(hkv, b, nblk * bs, hd).transpose(0, 1).float()
    values = v[:, tables.long()].reshape(hkv, b, nblk * bs, hd).transpose(0, 1).float()
    ends = lengths.view(-1, 1, 1) - queries + torch.arange(queries, device="cuda").view(1, -1, 1)  # [B, T, 1]
    mask = (torch.arange(nblk * bs, device="cuda").view(1, 1, -1) <= ends).unsqueeze(1)  # [B, 1, T, span]
    ref = F.scaled_dot_product_attention(q.float().transpose(1, 2), keys, values, attn_mask=mask, enable_gqa=True)
    ref = ref.transpose(1, 2)
    assert torch.allclose(got, ref, atol=2e-2, rtol=2e-2), (got - ref).abs().max()


def test_the_flash_backend_serves_the_tiny_checkpoint_on_the_device(tiny_dir):
    """`--attention-backend flash` (bf16): load, warm up (graphs captured over flash-attn), and the
    logits of sdpa, within bf16's rounding, for a prompt prefilled in two chunks and decoded on
    through each runner's CUDA graphs."""
    pytest.importorskip("flash_attn")
    from server.engine.runner import ModelRunner

    prompt = [1] + [(3 * j) % 200 + 5 for j in range(300)]
    ids = torch.tensor(prompt + [7, 9, 11, 13], device="cuda")
    logits = {}
    for backend in ("flash", "sdpa"):
        lm = load_model(tiny_dir, LoadOptions(device="cuda", dtype="bfloat16", attention_backend=backend))
        runner = ModelRunner(lm, max_batch_size=4, max_model_len=1024)
        runner.warm_up()
        assert runner.block_size == (256 if backend == "flash" else 16)
        assert lm.model.llm.attention_backend == backend  # no fallback
        assert runner.graphs is not None and runner.graphs.use_graphs
        llm, cache = lm.model.llm, runner.cache
        table = list(range(1, 1 + -(-len(ids) // runner.block_size)))
        emb = llm.embed(ids)
        llm.prefill(emb[:256], cache, start=0, table=table)
        rows = [llm.logits(llm.prefill(emb[256:len(prompt)], cache, start=256, table=table))]
        for pos in range(len(prompt), len(ids)):
            rows.append(runner.graphs([int(ids[pos])], [pos], [table])[0].clone())  # a view of the graph's buffer
        logits[backend] = torch.stack(rows)
    assert torch.allclose(logits["flash"], logits["sdpa"], atol=0.1, rtol=0.05), \
        (logits["flash"] - logits["sdpa"]).abs().max()
