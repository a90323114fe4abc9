"""Pointwise ops: the CUDA-friendly forms and the compiled kernels against the reference ops."""


import torch

from model.pointwise import PointwiseKernels, Rotary, add_rms_norm, rope


def _tables(seed=0):
    torch.manual_seed(seed)
    angles = torch.rand(2, 1, 3, 16) * 6
    return angles.cos(), angles.sin(), torch.randn(2, 4, 3, 16)


def test_rolled_rope_rotates_like_the_reference():
    """The CUDA form (roll and a sign-folded sin table, 3 kernels) against rotate_half (5)."""
    cos, sin, x = _tables()
    assert torch.allclose(Rotary(cos, sin, rolled=True)(x), Rotary(cos, sin, rolled=False)(x), atol=1e-6)
    assert torch.equal(Rotary(cos, sin)(x), rope(x, cos, sin))  # the CPU keeps the reference's ops


def test_add_rms_norm_carries_the_residual():
    torch.manual_seed(0)
    x, delta, w = torch.randn(3, 1, 8), torch.randn(3, 1, 8), torch.rand(8) + 0.5
    res, h = add_rms_norm(x, delta, w, 1e-6)
    assert torch.equal(res, x + delta)
    s = x + delta
    assert torch.allclose(h, w * s / s.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt(), atol=1e-6)
    assert torch.equal(add_rms_norm(x, None, w, 1e-6)[0], x)


def test_cpu_float32_rms_norm_is_the_reference_arithmetic_bit_for_bit():
    """The CPU takes torch's one-call rms_norm in float32 because it equals the reference's ops."""
    from model.pointwise import rms_norm

    torch.manual_seed(0)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for d in (64, 176, 512, 1000, 4096, 8192):
                for n in (1, 3, 64):
                    x, w = torch.randn(n, 1, d) * 5, torch.randn(d)
                    h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
                    assert torch.equal(rms_norm(x, w, 1e-5), w * h), (threads, d, n)
    finally:
        torch.set_num_threads(before)


def test_compiled_kernels_match_eager_in_the_decoder(tiny_lm, c_compiler):
    """The whole LLM with compiled kernels (what CUDA serving runs) against the eager forward."""
    llm = tiny_lm.model.llm
    torch.manual_seed(0)
    embeds = torch.randn(2, 30, tiny_lm.cfg.hidden_size)
    cache = llm.new_cache(num_slots=2, max_len=64)
    eager = [llm.prefill(embeds[i], cache, slot=i, start=0) for i in range(2)]
    eager.append(llm.decode(embeds[:, -1], [30, 30], cache))
    try:
        llm.compile_pointwise()
        assert llm.kernels.compiled
        compiled = [llm.prefill(embeds[i], cache, slot=i, start=0) for i in range(2)]
        compiled.append(llm.decode(embeds[:, -1], [30, 30], cache))
    finally:
        llm.compile_pointwise(False)
    assert not llm.kernels.compiled
    for a, b in zip(eager, compiled):
        assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    cos, sin, x = _tables()
    assert torch.allclose(PointwiseKernels.make_compiled().rope(x, cos, sin), rope(x, cos, sin), atol=1e-6)
