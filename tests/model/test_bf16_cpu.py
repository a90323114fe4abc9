"""bfloat16 on the CPU (`--dtype bfloat16`: half the memory, bf16 GEMMs where the CPU has them):
parity with float32 on the same checkpoint."""

import torch
import torch.nn.functional as F

from model.loading import LoadOptions, load_model


def _logits(lm, embeds, lengths):
    llm = lm.model.llm
    dtype = llm.lm_head.weight.dtype
    cache = llm.new_cache(num_slots=len(lengths), max_len=96, dtype=dtype, device="cpu")
    out = []
    for slot, n in enumerate(lengths):
        out.append(llm.logits(llm.prefill(embeds[slot, :n].to(dtype), cache, slot=slot, start=0).unsqueeze(0))[0])
    steps = [llm.logits(llm.decode(embeds[:, 80 + i].to(dtype), [n + i for n in lengths], cache)) for i in range(3)]
    return torch.stack(out), torch.cat(steps)


def test_bfloat16_on_the_cpu_stays_close_to_float32(tiny_dir, tiny_lm):
    bf16 = load_model(tiny_dir, LoadOptions(device="cpu", dtype="bfloat16"))
    llm = bf16.model.llm
    assert llm.lm_head.weight.dtype == torch.bfloat16
    assert llm.attention_backend == "sdpa" and not llm.batch_invariant  # float32-only paths stay off
    torch.manual_seed(0)
    embeds = torch.randn(3, 90, tiny_lm.cfg.hidden_size)
    lengths = [30, 57, 12]
    for ref, got in zip(_logits(tiny_lm, embeds, lengths), _logits(bf16, embeds, lengths)):
        assert got.dtype == torch.float32 and got.shape == ref.shape
        # bf16 keeps 8 bits of mantissa: each row's logits point the same way and stay within a few
        # percent of float32's spread; where float32 has a clear winner, bf16 picks it too
        assert F.cosine_similarity(got, ref, dim=-1).min() > 0.999
        assert ((got - ref).abs().amax(-1) / ref.std(-1)).max() < 0.1
        top2 = ref.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 0.1 * ref.std(-1)
        assert clear.any()
        assert torch.equal(got.argmax(-1)[clear], ref.argmax(-1)[clear])
