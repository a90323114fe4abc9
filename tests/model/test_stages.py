"""Model stages against straightforward re-computations and against transformers' own modules."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.adapters import GatedProjector
from model.local_compressor import Resampler, interpolate_pos_embed, sincos_pos_embed_2d
from model.selection import select_tokens, selection_scores
from model.slicing import count_image_tokens


def test_sincos_table_layout():
    t = sincos_pos_embed_2d(8, 3)  # E/4 = 2 frequencies: w = [1, 1/100]
    row, col = 1, 2
    e = t[row * 3 + col]
    assert np.allclose(e[:4], [math.sin(col), math.sin(col / 100), math.cos(col), math.cos(col / 100)], atol=1e-6)
    assert np.allclose(e[4:], [math.sin(row), math.sin(row / 100), math.cos(row), math.cos(row / 100)], atol=1e-6)


def _random_resampler(grid, dim, heads, seed=0):
    torch.manual_seed(seed)
    r = Resampler(grid_size=grid, embed_dim=dim, num_heads=heads, kv_dim=dim)
    with torch.no_grad():
        r.query.normal_()
        r.pos_embed.copy_(torch.from_numpy(sincos_pos_embed_2d(dim, grid)).half())
        for ln in (r.ln_q, r.ln_kv, r.ln_post):
            ln.weight.normal_(1, 0.1)
            ln.bias.normal_(0, 0.1)
    return r.eval()


def test_resampler_matches_explicit_attention():
    r = _random_resampler(grid=3, dim=8, heads=2)
    x = torch.randn(2, 16, 8)  # 4 x 4 keys, interpolated positions
    out = r(x)
    # explicit recomputation
    pos_k = F.interpolate(r.pos_embed.float().reshape(1, 3, 3, 8).permute(0, 3, 1, 2), size=(4, 4), mode="bicubic",
                          align_corners=False).permute(0, 2, 3, 1).reshape(16, 8).half().float()
    kv = F.layer_norm(x, (8,), r.ln_kv.weight, r.ln_kv.bias, 1e-6)
    q = F.layer_norm(r.query, (8,), r.ln_q.weight, r.ln_q.bias, 1e-6) + r.pos_embed.float()
    wq, wk, wv = r.attn.in_proj_weight.chunk(3)
    bq, bk, bv = r.attn.in_proj_bias.chunk(3)
    outs = []
    for n in range(2):
        qh = (q @ wq.T + bq).view(9, 2, 4).transpose(0, 1)
        kh = ((kv[n] + pos_k) @ wk.T + bk).view(16, 2, 4).transpose(0, 1)
        vh = (kv[n] @ wv.T + bv).view(16, 2, 4).transpose(0, 1)
        att = torch.softmax(qh @ kh.transpose(1, 2) / 2.0, dim=-1) @ vh
        o = att.transpose(0, 1).reshape(9, 8) @ r.attn.out_proj.weight.T + r.attn.out_proj.bias
        outs.append(F.layer_norm(o, (8,), r.ln_post.weight, r.ln_post.bias, 1e-6))
    assert out.shape == (2, 9, 8)
    assert torch.allclose(out, torch.stack(outs), atol=1e-5)


def test_same_size_interpolation_is_identity():
    pos = torch.from_numpy(sincos_pos_embed_2d(16, 24)).half()
    assert torch.equal(interpolate_pos_embed(pos, 24), pos)


def test_gate_mixes_two_experts():
    from model.config import SliMEConfig

    cfg = SliMEConfig(vocab_size=10, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, mm_hidden_size=128, mm_projector_type="gated")
    torch.manual_seed(0)
    p = GatedProjector(cfg).eval()
    with torch.no_grad():
        p.w_gate.normal_(0, 0.1)
        p.attn.query.normal_()
    g = torch.randn(1, 576, 128)
    out = p(g)
    e0 = p.projection(g)
    e1 = p.projection(p.attn(g))
    probs = torch.softmax(g @ p.w_gate, dim=-1)
    gates = probs / (probs.sum(-1, keepdim=True) + 1e-6)
    assert torch.allclose(out, gates[..., :1] * e0 + gates[..., 1:] * e1, atol=1e-5)
    # other lengths (local tokens) use expert 0 alone
    loc = torch.randn(3, 144, 128)
    assert torch.equal(p(loc), p.projection(loc))
    p.learnable_gated = 1
    assert torch.allclose(p(g), e1)


def test_selector_against_naive_recomputation():
    torch.manual_seed(0)
    local = torch.randn(50, 8)
    text = torch.randn(7, 8) + 2.0
    scores = selection_scores(local, text, num_pad=1)
    naive = torch.tensor([sum(float(F.cosine_similarity(v, t, dim=0)) for t in text) for v in local])
    assert torch.allclose(scores, naive, atol=1e-5)
    keep = select_tokens(scores, topp=0.95, temp=1.0)
    probs = torch.softmax(naive, 0).tolist()
    order = sorted(range(50), key=lambda i: -probs[i])
    cum, c = 0.0, 0
    for i in order:
        cum += probs[i]
        if cum <= 0.95:
            c += 1
    expect = sorted(order[:c + 1]) if c < 50 else list(range(50))
    assert keep.tolist() == expect
    assert 0 < len(expect) < 50


def test_selection_scores_are_bit_identical_to_reference_formula():
    torch.manual_seed(3)
    local = torch.randn(300, 64) * 2
    text = torch.randn(40, 64) + 1
    padded = torch.cat([text, torch.zeros(2, 64)])
    ref = F.cosine_similarity(local.unsqueeze(1), padded.unsqueeze(0), dim=-1)
    ref[:, -2:] = 0
    assert torch.equal(selection_scores(local, text, num_pad=2), ref.sum(-1))


def test_selector_keeps_all_when_mass_never_passes():
    keep = select_tokens(torch.zeros(4), topp=1.5, temp=1.0)
    assert keep.tolist() == [0, 1, 2, 3]


def test_spatial_order_and_token_counts_match_model(tiny_lm, ironing):
    from model.processor import prepare_image

    lm = tiny_lm
    for size in [(90, 60), (336, 336), (500, 1500), (4000, 300), (1000, 700)]:
        img = ironing.resize(size)
        prep = prepare_image(img, lm.cfg)
        count = count_image_tokens(*size)
        feats = lm.model.encode_images([torch.from_numpy(prep.pixels)], [prep.grid])[0]
        assert prep.grid == count.grid
        assert feats.global_rows.shape[0] == count.global_tokens
        assert feats.local_rows.shape[0] == count.local_tokens
    # spatial order: local row index = (tile_row*12 + y) * (cols*12) + tile_col*12 + x
    prep = prepare_image(ironing.resize((1000, 700)), lm.cfg)
    cols, rows = prep.grid
    px = torch.from_numpy(prep.pixels)
    feats = lm.model.encode_images([px], [prep.grid])[0]
    with torch.inference_mode():
        per_tile = lm.model.mm_projector.project(lm.model.post_qformer(lm.model.vision_tower(px[1:])))
    tile = 1 * cols + 2  # tile at row 1, col 2
    y, x = 5, 7
    idx = (1 * 12 + y) * (cols * 12) + 2 * 12 + x
    assert torch.equal(feats.local_rows[idx], per_tile[tile, y * 12 + x])


def test_clip_tower_matches_transformers(tiny_dir, tiny_lm):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    tower_dir = tiny_dir / "clip-vit-tiny-patch14-336"
    ref = transformers.CLIPVisionModel(transformers.CLIPVisionConfig.from_pretrained(tower_dir)).eval()
    sd = load_file(tower_dir / "model.safetensors")
    own = set(ref.state_dict())
    # transformers 5 names the module's tensors without the checkpoint's `vision_model.` prefix
    sd = {k if k in own else k.removeprefix("vision_model."): v for k, v in sd.items()}
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)
    px = torch.randn(2, 3, 336, 336)
    with torch.inference_mode():
        expect = ref(px, output_hidden_states=True).hidden_states[-2][:, 1:]
        got = tiny_lm.model.vision_tower(px)
    assert got.shape == (2, 576, 128)
    assert torch.allclose(got, expect, atol=1e-4)


@pytest.mark.parametrize("invariant,inplace", [(True, True), (True, False), (False, False)],
                         ids=["cpu-inplace-kernel", "cpu-gather", "gpu-style-masked"])
def test_llm_matches_transformers_llama(tiny_dir, tiny_lm, invariant, inplace, monkeypatch):
    llm = tiny_lm.model.llm
    monkeypatch.setattr(llm, "execution", replace(llm.execution, batch_invariant=invariant,
                                                  attention="cpu" if inplace else "sdpa"))
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    cfg = tiny_lm.cfg
    hf_cfg = transformers.LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                                      intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
                                      num_attention_heads=cfg.num_attention_heads,
                                      num_key_value_heads=cfg.num_key_value_heads, rms_norm_eps=cfg.rms_norm_eps,
                                      rope_theta=cfg.rope_theta, max_position_embeddings=cfg.max_position_embeddings)
    ref = transformers.LlamaForCausalLM(hf_cfg).eval()
    sd = {k: v for k, v in load_file(tiny_dir / "model.safetensors").items() if not k.startswith("model.mm_")
          and not k.startswith("model.sampler")}
    ref.load_state_dict(sd, strict=False)
    torch.manual_seed(0)
    embeds = torch.randn(1, 40, cfg.hidden_size)
    with torch.inference_mode():
        expect = ref(inputs_embeds=embeds).logits[0]
        llm = tiny_lm.model.llm
        cache = llm.new_cache(num_slots=3, max_len=64, dtype=torch.float32, device="cpu")
        last = llm.prefill(embeds[0, :30], cache, slot=0, start=0)
        assert torch.allclose(llm.logits(last), expect[29], atol=1e-4)
        # chunked prefill continues from the cache
        last = llm.prefill(embeds[0, 30:36], cache, slot=0, start=30)
        assert torch.allclose(llm.logits(last), expect[35], atol=1e-4)
        # batched decode: slot 0 at position 36, slot 1 holds a shorter sequence
        llm.prefill(embeds[0, :20], cache, slot=1, start=0)
        h = llm.decode(torch.stack([embeds[0, 36], embeds[0, 20]]), [36, 20], cache)
        assert torch.allclose(llm.logits(h[0]), expect[36], atol=1e-4)
        assert torch.allclose(llm.logits(h[1]), expect[20], atol=1e-4)


def test_decode_is_batch_invariant_on_cpu(tiny_lm, intra_op_threads):
    """float32 on the CPU: a sequence's logits are bit-identical alone and among 15 others."""
    llm = tiny_lm.model.llm
    assert llm.batch_invariant
    cfg = tiny_lm.cfg
    torch.manual_seed(0)
    embeds = torch.randn(16, 1400, cfg.hidden_size)
    lengths = [700 + 41 * i for i in range(16)]

    def run(rows):
        cache = llm.new_cache(num_slots=16, max_len=1500, dtype=torch.float32, device="cpu")
        for slot, i in enumerate(rows):
            llm.prefill(embeds[i, :lengths[i]], cache, slot=slot, start=0)
        h = llm.decode(torch.stack([embeds[i, 1399] for i in rows]), [lengths[i] for i in rows], cache)
        return llm.logits(h)

    together = run(list(range(16)))
    for i in (0, 7, 15):
        assert torch.equal(run([i])[0], together[i])
    assert torch.equal(run([3, 9])[1], together[9])
    assert torch.equal(run(list(range(5, 10)))[2], together[7])  # 5 rows: padded to 8


def test_paged_cache_writes_and_gathers_through_block_tables():
    from model.kv_cache import NULL_BLOCK, KVCache

    cache = KVCache(num_layers=2, num_blocks=6, block_size=4, num_kv_heads=2, head_dim=3, dtype=torch.float32,
                    device="cpu")
    assert cache.k.shape == cache.v.shape == (2, 2, 6, 4, 3) and cache.max_len == 20
    table = [5, 2, 3]  # any blocks, in any order
    tables = cache.tables([table], 12)
    keys = torch.randn(2, 10, 3)  # [Hkv, positions 0..9, hd]
    blocks, offsets = cache.where(tables[0], torch.arange(10))
    assert blocks.tolist() == [5] * 4 + [2] * 4 + [3] * 2 and offsets.tolist() == [0, 1, 2, 3] * 2 + [0, 1]
    cache.write(1, blocks, offsets, keys, -keys)
    k, v = cache.gather(1, cache.tables([table, [3]], 12))  # [Hkv, B, span, hd], padded with the null block
    assert k.shape == (2, 2, 12, 3)
    assert torch.equal(k[:, 0, :10], keys) and torch.equal(v[:, 0, :10], -keys)
    assert torch.equal(k[:, 1, :2], keys[:, 8:10])  # block 3 seen through another table
    assert cache.k[0].abs().sum() == 0 and cache.k[1][:, NULL_BLOCK].abs().sum() == 0
    with pytest.raises(IndexError):
        cache.slot_table(0)  # not a slot cache
    slots = KVCache.for_slots(num_slots=2, max_len=10, block_size=4, num_layers=1, num_kv_heads=1, head_dim=2,
                              dtype=torch.float32, device="cpu")
    assert slots.slot_table(0) == [1, 2, 3] and slots.slot_table(1) == [4, 5, 6]


def test_decode_reads_any_block_order_alike(tiny_lm):
    """The same sequence in scattered blocks decodes to the same bits as in a contiguous slot."""
    llm = tiny_lm.model.llm
    torch.manual_seed(0)
    embeds = torch.randn(101, tiny_lm.cfg.hidden_size)
    a = llm.new_cache(num_slots=1, max_len=128, dtype=torch.float32, device="cpu")
    b = llm.new_cache(num_blocks=40, dtype=torch.float32, device="cpu")
    scattered = [31, 4, 17, 9, 22, 38, 2]
    outs = []
    for cache, table in ((a, a.slot_table(0)), (b, scattered)):
        llm.prefill(embeds[:60], cache, start=0, table=table)
        llm.prefill(embeds[60:100], cache, start=60, table=table)  # a later chunk reads the cache
        outs.append(llm.logits(llm.decode(embeds[100:], [100], cache, [table])))
    assert torch.equal(outs[0], outs[1])


@pytest.fixture(params=[1, 2, 4], ids=lambda n: f"{n}-threads")
def intra_op_threads(request):
    """GEMMs split rows between threads: invariance must hold whatever the thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def test_padded_linear_rows_do_not_depend_on_the_batch(intra_op_threads):
    from model.llm import linear

    torch.manual_seed(1)
    for d_in, d_out in [(64, 176), (176, 64), (64, 1200), (512, 512)]:
        layer = torch.nn.Linear(d_in, d_out, bias=False)
        x = torch.randn(40, 1, d_in)
        full = linear(layer, x, per_row=True)
        for n in (1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 17):
            assert torch.equal(linear(layer, x[:n], per_row=True), full[:n]), (d_in, d_out, n)


def test_packed_linear_rows_do_not_depend_on_the_batch_and_match_f_linear(intra_op_threads):
    from model.llm import pack_weight, packed_linear

    torch.manual_seed(2)
    for d_in, d_out in [(64, 176), (176, 64), (64, 1200), (512, 3072), (1536, 512)]:
        weight = torch.randn(d_out, d_in)
        packed = pack_weight(weight)
        x = torch.randn(70, 1, d_in)
        full = packed_linear(x, packed, None)
        assert torch.allclose(full, torch.nn.functional.linear(x, weight), atol=1e-4)
        for n in (1, 2, 3, 4, 5, 7, 9, 16, 17, 33, 64):
            assert torch.equal(packed_linear(x[:n], packed, None), full[:n]), (d_in, d_out, n)


def test_cpu_float32_projections_and_lm_head_run_packed(tiny_lm):
    llm = tiny_lm.model.llm
    for layer in llm.model.layers:
        assert layer.self_attn.qkv_packed is not None and layer.mlp.gate_up_packed is not None
        assert layer.self_attn.o_proj.packed is not None and layer.mlp.down_proj.packed is not None
    assert llm.lm_head.packed is not None


def test_fused_decode_projections_share_weights_and_match(tiny_lm):
    llm = tiny_lm.model.llm
    attn, mlp = llm.model.layers[0].self_attn, llm.model.layers[0].mlp
    assert attn.fused and mlp.fused  # loaded for CPU float32
    # the separate projections are views of the fused matrix: one copy of the weights
    assert attn.q_proj.weight.data_ptr() == attn.qkv_weight.data_ptr()
    assert mlp.up_proj.weight.data_ptr() == mlp.gate_up_weight[mlp.gate_proj.weight.shape[0]:].data_ptr()
    assert not any("qkv" in k or "gate_up" in k for k in llm.state_dict())  # checkpoint names unchanged
    cache = llm.new_cache(num_slots=2, max_len=64, dtype=torch.float32, device="cpu")
    torch.manual_seed(0)
    embeds = torch.randn(21, tiny_lm.cfg.hidden_size)
    llm.prefill(embeds[:20], cache, slot=0, start=0)
    fused = llm.decode(embeds[20:], [20], cache)
    layers = list(llm.model.layers)
    try:
        for layer in layers:
            layer.self_attn.fused = layer.mlp.fused = False
        separate = llm.decode(embeds[20:], [20], cache)
    finally:
        for layer in layers:
            layer.self_attn.fused = layer.mlp.fused = True
    assert torch.allclose(fused, separate, atol=1e-6)

