"""The CPU float32 decode step as one flat loop over the layers.

`LlamaForCausalLM._run` serves every device and mode through modules, `Step` and generic helpers;
at batch 1 on the CPU those Python frames cost about as much as the non-GEMM work itself, and every
op releases and retakes the GIL that the HTTP event loop wants too. Here the same ops (so the same
bits: tested against `_run`) are called directly: per layer the input RMSNorm, the packed q/k/v
GEMM, the attention kernel (RoPE, cache write, paged attention; `model.paged_attention_cpu`), the
packed output GEMM, the residual add and the post-attention RMSNorm, the packed gate/up GEMM,
SiLU times up, the packed down GEMM and its residual add.

Used when the model is in its CPU float32 serving form: packed weights, fused q/k/v and gate/up,
the in-place attention kernel, eager pointwise ops (`ready`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import paged_attention_cpu
from .kv_cache import KVCache

_linear = torch.ops.mkldnn._linear_pointwise if hasattr(torch.ops, "mkldnn") else None


def ready(llm) -> bool:
    """True when `llm` (a LlamaForCausalLM) is in the form this step computes."""
    return (llm.attention_backend == "cpu" and llm.packed and not llm.kernels.compiled
            and all(layer.self_attn.fused and layer.mlp.fused for layer in llm.model.layers))


def _plan(llm) -> list[tuple]:
    """Per layer, what the step reads, looked up once (module attribute lookups are not free)."""
    plan = getattr(llm, "_cpu_decode_plan", None)
    if plan is None:
        plan = []
        for i, layer in enumerate(llm.model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            n1, n2 = layer.input_layernorm, layer.post_attention_layernorm
            plan.append((i, n1.weight, n1.eps, attn.qkv_packed, attn.qkv_bias, attn.num_heads + 2 * attn.num_kv_heads,
                         attn.o_proj.packed, attn.o_proj.bias, n2.weight, n2.eps, mlp.gate_up_packed,
                         mlp.gate_up_bias, mlp.down_proj.packed, mlp.down_proj.bias))
        llm._cpu_decode_plan = plan
    return plan


def decode_step(llm, x: torch.Tensor, positions: torch.Tensor, tables: torch.Tensor, cache: KVCache,
                length: int) -> torch.Tensor:
    """x `[B, D]` (the new tokens' embeddings), positions `[B]`, block tables `[B, nblk]` ->
    the final-norm hidden states `[B, D]`. `length`: positions the RoPE table must cover."""
    b, d = x.shape
    hd = llm.cfg.dim_head
    cos, sin = llm.rope_tables(length, x.device)
    step = paged_attention_cpu.DecodeStep(cos[positions], sin[positions], tables, positions)  # cos / sin [B, hd]
    delta = None
    for (i, w1, eps1, qkv_w, qkv_b, heads, o_w, o_b, w2, eps2, gu_w, gu_b, down_w, down_b) in _plan(llm):
        if delta is not None:
            x = x + delta
        h = F.rms_norm(x, (d,), w1, eps1)
        qkv = _linear(h, qkv_w, qkv_b, "none", [], "")
        attn = paged_attention_cpu.decode_attention(qkv.view(b, heads, hd), step, *cache.numpy_layer(i))
        x = x + _linear(attn, o_w, o_b, "none", [], "")
        h = F.rms_norm(x, (d,), w2, eps2)
        gate, up = _linear(h, gu_w, gu_b, "none", [], "").chunk(2, dim=-1)
        delta = _linear(F.silu(gate) * up, down_w, down_b, "none", [], "")
    norm = llm.model.norm
    return F.rms_norm(x + delta, (d,), norm.weight, norm.eps)
