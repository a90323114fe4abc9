"""The flat CPU float32 decode step computes the very bits of the module path it short-cuts."""

import torch

from model import cpu_decode


def test_the_flat_step_equals_the_module_path_bit_for_bit(tiny_lm, monkeypatch):
    llm = tiny_lm.model.llm
    assert cpu_decode.ready(llm)  # the CPU float32 serving form takes it
    torch.manual_seed(0)
    embeds = torch.randn(6, 80, tiny_lm.cfg.hidden_size)
    lengths = [5, 70, 33, 17, 64, 1]
    outs, caches = [], []
    for flat in (True, False):
        monkeypatch.setattr(cpu_decode, "ready", lambda llm, flat=flat: flat)
        cache = llm.new_cache(num_slots=6, max_len=96, dtype=torch.float32, device="cpu")
        for slot, n in enumerate(lengths):
            llm.prefill(embeds[slot, :n], cache, slot=slot, start=0)
        hidden = [llm.decode(embeds[:, 79], lengths, cache), llm.decode(embeds[:1, 78], [lengths[0] + 1], cache)]
        outs.append([llm.logits(h) for h in hidden])
        caches.append(cache)
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    assert torch.equal(caches[0].k, caches[1].k) and torch.equal(caches[0].v, caches[1].v)


def test_other_forms_take_the_module_path(tiny_lm, monkeypatch):
    llm = tiny_lm.model.llm
    monkeypatch.setattr(llm, "execution", llm.execution.with_attention("sdpa"))
    assert not cpu_decode.ready(llm)
    monkeypatch.setattr(llm, "execution", llm.execution.with_attention("cpu"))
    monkeypatch.setattr(llm.model.layers[1].mlp, "fused", False)
    assert not cpu_decode.ready(llm)
