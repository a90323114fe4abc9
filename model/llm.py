"""Llama decoder (weight names as in transformers' `LlamaForCausalLM`) over a paged KV cache.

Two entry points, both taking input embeddings so that image rows can be spliced in:
`prefill` runs one sequence's chunk of positions; `decode` runs one new token for each of B
sequences, each reading and writing the paged cache through its block table, as ONE batched
forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import SliMEConfig
from .execution import ATTENTION_BACKENDS, Execution
from . import cpu_decode, paged_attention_cpu, paged_attention_flash, paged_attention_triton
from .kv_cache import KVCache
from .pointwise import PointwiseKernels, Rotary, rms_norm, silu_mul


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rope_inv_freq(cfg: SliMEConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies `[hd/2]` and the attention scaling, for default/linear/llama3 RoPE."""
    dim = cfg.dim_head
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in (None, "default"):
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / scaling["factor"], 1.0
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: default, linear, llama3)")


GEMM_ROW_BLOCK = 4


def padded_rows(n: int) -> int:
    """Rows a batch-invariant GEMM runs with: `n` rounded up to a multiple of GEMM_ROW_BLOCK."""
    return -(-max(n, 1) // GEMM_ROW_BLOCK) * GEMM_ROW_BLOCK


def linear(layer: nn.Module, x: torch.Tensor, per_row: bool = False) -> torch.Tensor:
    """`layer(x)`; with `per_row`, computed so that each row's result does not depend on how many
    rows there are.

    CPU GEMM kernels take another path for 1-3 rows than for 4 or more, which changes the last bits,
    and with several threads they split the rows between threads, so a row count that is not a
    multiple of 4 leaves a thread a 1-3 row remainder. With the rows padded to a multiple of 4,
    every row comes out the same whatever the count and the thread count (checked in tests with 1
    to 4 threads): a sequence decodes to the same bits alone or among 15 others, and the batch
    still runs as one matrix product.
    """
    packed = getattr(layer, "packed", None)
    if packed is not None:
        return packed_linear(x, packed, layer.bias)
    if not per_row or type(layer) is not nn.Linear:
        return layer(x)
    return gemm_rows(x, layer.weight, layer.bias)


def project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed: torch.Tensor | None,
            per_row: bool) -> torch.Tensor:
    """A fused projection (see `fuse_linears`): through its packed weight when there is one."""
    if packed is not None:
        return packed_linear(x, packed, bias)
    return (gemm_rows if per_row else F.linear)(x, weight, bias)


# oneDNN packs a weight for the row counts it expects; decode batches are small
PACK_BATCH_HINT = 16


def can_pack() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


# Weight shapes `(out, in)` whose single-row product differs in the last bit from the same row
# inside a larger batch: oneDNN takes a GEMV path for one row on some CPUs (AMD Zen 4 with large
# `in`, found by CI) and a GEMM path otherwise. Probed once per shape at packing time.
_SINGLE_ROW_DIFFERS: dict[tuple[int, int], bool] = {}


def _onednn_linear(rows: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(rows, packed, bias, "none", [], "")


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """`weight` `[out, in]` (CPU, float32) in oneDNN's blocked layout for `packed_linear`."""
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_BATCH_HINT)
    shape = tuple(weight.shape)
    if shape not in _SINGLE_ROW_DIFFERS:
        x = torch.randn(2, shape[1], generator=torch.Generator().manual_seed(0))
        _SINGLE_ROW_DIFFERS[shape] = not torch.equal(_onednn_linear(x[:1], packed, None),
                                                     _onednn_linear(x, packed, None)[:1])
    return packed


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear` through oneDNN with a packed weight (CPU float32): faster than MKL's sgemm
    for decode's few rows (BENCHMARKS.md), and row-invariant like the padded GEMM (each
    row's result does not depend on how many rows there are; tested with 1-4 threads). Where one
    row would take another kernel than several, it goes with a zero row (see _SINGLE_ROW_DIFFERS)."""
    shape = x.shape
    rows = x.reshape(-1, shape[-1])
    if rows.shape[0] == 1 and _SINGLE_ROW_DIFFERS.get(tuple(packed.shape)):
        return _onednn_linear(torch.cat([rows, rows.new_zeros(1, shape[-1])]), packed, bias)[:1].reshape(
            *shape[:-1], -1)
    return _onednn_linear(rows, packed, bias).reshape(*shape[:-1], -1)


def gemm_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Batch-invariant `F.linear` (see `linear`): rows padded to a multiple of GEMM_ROW_BLOCK."""
    shape = x.shape
    rows = x.reshape(-1, shape[-1])
    n = rows.shape[0]
    if n != padded_rows(n):
        rows = torch.cat([rows, rows.new_zeros(padded_rows(n) - n, shape[-1])])
    return F.linear(rows, weight, bias)[:n].reshape(*shape[:-1], -1)


def fuse_linears(owner: nn.Module, name: str, layers: list[nn.Module]) -> bool:
    """Concatenate the weights (and biases) of linears that read the same input into one matrix,
    registered on `owner` as non-persistent buffers `{name}_weight` / `{name}_bias`; each layer's
    parameters become views of it (no second copy). One GEMM then replaces several in decode.
    Returns False (nothing done) unless every layer is a plain `nn.Linear`."""
    if any(type(layer) is not nn.Linear for layer in layers):
        return False
    weight = torch.cat([layer.weight.detach() for layer in layers])
    biases = [layer.bias for layer in layers]
    bias = None if any(b is None for b in biases) else torch.cat([b.detach() for b in biases])
    start = 0
    for layer in layers:
        rows = layer.weight.shape[0]
        layer.weight = nn.Parameter(weight[start:start + rows], requires_grad=False)
        if bias is not None:
            layer.bias = nn.Parameter(bias[start:start + rows], requires_grad=False)
        start += rows
    owner.register_buffer(f"{name}_weight", weight, persistent=False)
    owner.register_buffer(f"{name}_bias", bias, persistent=False)
    return True


KEY_BUCKET = 64


def key_span(lengths: list[int], block_size: int) -> int:
    """Keys a batch-invariant decode step reads per sequence: the longest length rounded up to
    KEY_BUCKET (and to whole blocks)."""
    unit = math.lcm(KEY_BUCKET, block_size)
    return -(-max(lengths) // unit) * unit


def bucket_bias(lengths: list[int], span: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`[B, 1, 1, span]`: 0 for a valid key, -inf for padding. Added to the scores (x + 0 == x
    exactly): a broadcast add is several times cheaper than `masked_fill` with a broadcast mask."""
    lens = torch.tensor(lengths, device=device).view(-1, 1, 1, 1)
    pad = torch.arange(span, device=device) >= lens
    return torch.zeros(pad.shape, dtype=dtype, device=device).masked_fill_(pad, float("-inf"))


def paged_decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Batch-invariant decode attention: q `[B, H, 1, hd]` over each sequence's gathered blocks,
    keys and values `[Hkv, B, span, hd]`, padding masked by `bias` `[B, 1, 1, span]` (see
    `bucket_bias`) -> `[B, H, 1, hd]`.

    Each score is its own dot product, and the softmax and value sums see the valid keys at the
    same offsets whatever the padding, so a row's result does not depend on the other rows
    (checked bit for bit in tests), while the whole batch is two matmuls instead of one kernel
    call per sequence.
    """
    b, h, _, hd = q.shape
    hkv, _, span, _ = keys.shape
    qg = q.view(b, hkv, h // hkv, hd).transpose(0, 1)  # [Hkv, B, g, hd]: query heads by KV head
    scores = torch.matmul(qg, keys.transpose(-1, -2))  # [Hkv, B, g, span]
    scores = scores.mul_(hd**-0.5).add_(bias.view(1, b, 1, span))
    out = torch.matmul(torch.softmax(scores, dim=-1), values)  # [Hkv, B, g, hd]
    return out.transpose(0, 1).reshape(b, h, 1, hd)


class Attention(nn.Module):
    def __init__(self, cfg: SliMEConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.dim_head
        d, b = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(d, self.num_heads * self.head_dim, bias=b)
        self.k_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=b)
        self.v_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=b)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=b)
        self.fused = False  # see `fuse`
        self.qkv_packed: torch.Tensor | None = None  # see `LlamaForCausalLM.pack_weights`

    def fuse(self) -> None:
        """q, k and v projections as one GEMM (and one RoPE)."""
        self.fused = fuse_linears(self, "qkv", [self.q_proj, self.k_proj, self.v_proj])

    def forward(self, x: torch.Tensor, rope: Rotary, cache: KVCache, step: "Step") -> torch.Tensor:
        b, t, _ = x.shape  # [B, T, D]
        pr = step.per_row
        h, hkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        if step.backend == "cpu":  # CPU float32 decode: RoPE, the cache write and attention in one call
            if self.fused:
                qkv = project(x, self.qkv_weight, self.qkv_bias, self.qkv_packed, pr)
            else:
                qkv = torch.cat([linear(p, x, pr) for p in (self.q_proj, self.k_proj, self.v_proj)], dim=-1)
            real = step.positions.shape[0]  # rows past it only pad the batch (see `linear`)
            if step.kernel is None:  # the first layer converts what all layers share
                step.kernel = paged_attention_cpu.DecodeStep(rope.cos[:real].view(real, hd),
                                                             rope.sin[:real].view(real, hd), step.tables, step.positions)
            out = paged_attention_cpu.decode_attention(qkv[:real].view(real, h + 2 * hkv, hd), step.kernel,
                                                       *cache.numpy_layer(self.layer_idx)).view(real, t, h * hd)
            if real < b:
                out = torch.cat([out, out.new_zeros(b - real, t, out.shape[-1])])
            return linear(self.o_proj, out, pr)
        if self.fused:
            qkv = project(x, self.qkv_weight, self.qkv_bias, self.qkv_packed, pr)
            qkv = qkv.view(b, t, h + 2 * hkv, hd).transpose(1, 2)
            qk = qkv[:, :h + hkv]  # RoPE on q and k heads at once: the same elementwise ops
            qk = rope(qk)
            q, k, v = qk[:, :h], qk[:, h:], qkv[:, h + hkv:]  # [B, H|Hkv, T, hd]
        else:
            q = linear(self.q_proj, x, pr).view(b, t, h, hd).transpose(1, 2)  # [B, H, T, hd]
            k = linear(self.k_proj, x, pr).view(b, t, hkv, hd).transpose(1, 2)
            v = linear(self.v_proj, x, pr).view(b, t, hkv, hd).transpose(1, 2)
            q, k = rope(q), rope(k)
        layer = self.layer_idx
        gqa = self.num_kv_heads != self.num_heads
        if step.positions is not None:  # decode: row i feeds one token at positions[i]
            real = step.positions.shape[0]  # rows past it only pad the batch (see `linear`)
            if step.backend != "triton":  # the Triton kernel writes the new K/V itself
                cache.write(layer, *step.write_at, k[:real, :, 0].transpose(0, 1), v[:real, :, 0].transpose(0, 1))
            if step.backend in ("triton", "flash"):  # read the blocks where they lie
                if step.backend == "flash":
                    out = paged_attention_flash.attend(q[:real].transpose(1, 2), cache.k[layer], cache.v[layer],
                                                       step.tables, step.lengths)  # [B, 1, H, hd]
                else:
                    out = paged_attention_triton.paged_decode(q[:real, :, 0], cache.k[layer], cache.v[layer],
                                                              step.tables, step.lengths, splits=step.splits,
                                                              k_new=k[:real, :, 0], v_new=v[:real, :, 0])
                out = out.reshape(real, t, -1)
                if real < b:
                    out = torch.cat([out, out.new_zeros(b - real, t, out.shape[-1])])
                return linear(self.o_proj, out, pr)
            keys, values = cache.gather(layer, step.tables)  # [Hkv, B, span, hd]
            if step.per_row:
                out = paged_decode_attention(q[:real], keys, values, step.pad)
                out = out.transpose(1, 2).reshape(real, t, -1)
                if real < b:
                    out = torch.cat([out, out.new_zeros(b - real, t, out.shape[-1])])
                return linear(self.o_proj, out, pr)
            k, v = keys.transpose(0, 1), values.transpose(0, 1)  # [B, Hkv, span, hd]
        else:  # prefill: one sequence's positions start..start+T-1
            cache.write(layer, *step.write_at, k[0], v[0])
            if step.backend == "flash":  # every chunk over the cache, its own new keys included
                out = paged_attention_flash.attend(q.transpose(1, 2), cache.k[layer], cache.v[layer], step.tables,
                                                   step.lengths)  # [1, T, H, hd]
                return linear(self.o_proj, out.reshape(b, t, -1), pr)
            if step.start:  # a later chunk: attend to the cached prefix as well
                keys, values = cache.gather(layer, step.tables)  # [Hkv, 1, span, hd]
                k = keys[:, :, :step.start + t].transpose(0, 1)
                v = values[:, :, :step.start + t].transpose(0, 1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=step.mask, is_causal=step.causal, enable_gqa=gqa)
        return linear(self.o_proj, out.transpose(1, 2).reshape(b, t, -1), pr)


class MLP(nn.Module):
    def __init__(self, cfg: SliMEConfig):
        super().__init__()
        d, i, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(d, i, bias=b)
        self.up_proj = nn.Linear(d, i, bias=b)
        self.down_proj = nn.Linear(i, d, bias=b)
        self.fused = False
        self.gate_up_packed: torch.Tensor | None = None

    def fuse(self) -> None:
        """gate and up projections as one GEMM."""
        self.fused = fuse_linears(self, "gate_up", [self.gate_proj, self.up_proj])

    def forward(self, x: torch.Tensor, per_row: bool = False, act: Callable = silu_mul) -> torch.Tensor:
        if self.fused:
            gate, up = project(x, self.gate_up_weight, self.gate_up_bias, self.gate_up_packed, per_row).chunk(2, dim=-1)
        else:
            gate, up = linear(self.gate_proj, x, per_row), linear(self.up_proj, x, per_row)
        return linear(self.down_proj, act(gate, up), per_row)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: SliMEConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    # No forward: `LlamaForCausalLM._run` runs the sublayers, carrying the residual stream so that
    # each residual add fuses with the RMSNorm after it.


class LlamaModel(nn.Module):
    def __init__(self, cfg: SliMEConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: SliMEConfig):
        super().__init__()
        self.cfg = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None
        # How it runs (attention backend, batch invariance, fused/packed weights, graphs), decided
        # once at load: see `model.execution` and `configure`. Unconfigured: sdpa, nothing else.
        self.execution = Execution()
        self.packed = False  # every projection and the LM head through oneDNN (see `pack_weights`)
        self._cpu_decode_plan: list | None = None  # see `model.cpu_decode`
        self.kernels = PointwiseKernels()  # eager; see compile_pointwise

    @property
    def attention_backend(self) -> str:
        return self.execution.attention

    @property
    def batch_invariant(self) -> bool:
        """Batched decode computes each row exactly as a solo decode would (see `linear`). Costs
        little on the CPU, where float32 results are expected to be batch-invariant; off on GPUs."""
        return self.execution.batch_invariant

    def configure(self, execution: Execution) -> None:
        """Apply the load-time decision (`model.execution.choose`): fused, then packed weights, then
        the attention backend (checked: ValueError where it cannot run here)."""
        if execution.fuse:
            self.fuse_projections()
        if execution.pack:
            self.pack_weights()
        self.execution = execution.with_attention("sdpa")
        self.set_attention_backend(execution.attention)

    def set_attention_backend(self, backend: str) -> None:
        """Attend through `backend` (see `model.execution`) from now on: at load, or in place of a
        kernel that failed its warm-up. ValueError where it cannot run here."""
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r} ({', '.join(ATTENTION_BACKENDS)})")
        w = self.lm_head.weight
        if backend == "cpu" and not (paged_attention_cpu.available() and w.device.type == "cpu"
                                     and w.dtype == torch.float32):
            raise ValueError("the cpu attention backend needs the model in float32 on the CPU, and numba")
        if backend == "triton" and not paged_attention_triton.available():
            raise ValueError("the triton attention backend needs triton (pip install triton)")
        if backend == "flash" and not paged_attention_flash.available():
            raise ValueError("the flash attention backend needs flash-attn (pip install 'slime-serve[gpu]')")
        if backend == "cpu":
            paged_attention_cpu.warm_up()
        self.execution = self.execution.with_attention(backend)

    # -- RoPE tables -----------------------------------------------------------------------------
    def rope_tables(self, max_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin `[N, hd]` float32 for N >= max(max_len, max_position_embeddings), built once.

        One fixed-size table: vectorised cos/sin can round an element differently depending on
        where it falls in the vector loop, so tables of different lengths are not bit-equal.
        """
        if self._rope is None or self._rope[0].shape[0] < max_len or self._rope[0].device != device:
            size = max(max_len, self.cfg.max_position_embeddings)
            if self._rope is not None and self._rope[0].shape[0] < max_len:
                size = max(size, 2 * self._rope[0].shape[0])
            inv_freq, scale = rope_inv_freq(self.cfg)
            t = torch.arange(size, dtype=torch.float32)
            freqs = torch.outer(t, inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)
            self._rope = ((emb.cos() * scale).to(device), (emb.sin() * scale).to(device))
        return self._rope

    def _cos_sin(self, positions: torch.Tensor, dtype: torch.dtype, length: int):
        cos, sin = self.rope_tables(length, positions.device)
        # [B, T] -> [B, 1, T, hd], cast to the activations' dtype as transformers does
        return cos[positions].unsqueeze(1).to(dtype), sin[positions].unsqueeze(1).to(dtype)

    def fuse_projections(self) -> None:
        """q/k/v and gate/up as one GEMM each (weights shared as views; quantized layers stay as
        they are): fewer, larger kernels, which matters most for small decode batches."""
        for layer in self.model.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()

    def pack_weights(self) -> bool:
        """CPU float32: every LLM projection and the LM head through oneDNN with packed weights
        (`packed_linear`). The packed copies sit beside the weights (which stay the model's
        parameters): the LLM's linear weights take twice the memory. False where oneDNN is missing."""
        if not can_pack() or self.lm_head.weight.device.type != "cpu" or self.lm_head.weight.dtype != torch.float32:
            return False
        linears = [self.lm_head]
        for layer in self.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            if attn.fused:
                attn.qkv_packed = pack_weight(attn.qkv_weight)
            else:
                linears += [attn.q_proj, attn.k_proj, attn.v_proj]
            if mlp.fused:
                mlp.gate_up_packed = pack_weight(mlp.gate_up_weight)
            else:
                linears += [mlp.gate_proj, mlp.up_proj]
            linears += [attn.o_proj, mlp.down_proj]
        for lin in linears:
            if type(lin) is nn.Linear:
                lin.packed = pack_weight(lin.weight)
        self.packed = all(getattr(lin, "packed", None) is not None for lin in linears)
        self._cpu_decode_plan = None  # `cpu_decode` looks the packed weights up again
        return True

    def new_cache(self, *, num_slots: int | None = None, max_len: int | None = None, num_blocks: int | None = None,
                  block_size: int = 16, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> KVCache:
        """A paged KV cache for this model: `num_blocks` blocks for an engine that assigns them,
        or `num_slots` fixed tables of `max_len` positions (see `KVCache.for_slots`). The flash
        backend takes blocks of a multiple of 256 positions: `block_size` is rounded up to one."""
        cfg, w = self.cfg, self.lm_head.weight
        block_size = self.execution.block_size(block_size)
        kw = dict(num_layers=cfg.num_hidden_layers, num_kv_heads=cfg.num_key_value_heads, head_dim=cfg.dim_head,
                  dtype=dtype or w.dtype, device=device or w.device, block_size=block_size)
        if num_blocks is not None:
            return KVCache(num_blocks=num_blocks, **kw)
        assert num_slots is not None and max_len is not None, "give num_blocks, or num_slots and max_len"
        return KVCache.for_slots(num_slots=num_slots, max_len=max_len, **kw)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(ids)

    def compile_pointwise(self, enable: bool = True) -> None:
        """Norms with their residual adds, RoPE and SiLU as generated kernels (CUDA; see
        `model.pointwise`); compiled at their first call."""
        self.kernels = PointwiseKernels.make_compiled() if enable else PointwiseKernels()

    def _run(self, x, positions, cache, step, length: int) -> torch.Tensor:
        ops = self.kernels
        if ops.compiled and x.storage_offset():  # a later prompt chunk: compiled kernels specialise
            x = x.clone()  # on offset 0 vs not (and would compile again in the middle of serving)
        rope = Rotary(*self._cos_sin(positions, x.dtype, length), kernel=ops.rope)
        delta = None
        for layer in self.model.layers:
            norm = layer.input_layernorm
            x, h = ops.add_rms_norm(x, delta, norm.weight, norm.eps)
            delta = layer.self_attn(h, rope, cache, step)
            norm = layer.post_attention_layernorm
            x, h = ops.add_rms_norm(x, delta, norm.weight, norm.eps)
            delta = layer.mlp(h, step.per_row, ops.silu_mul)
        return ops.add_rms_norm(x, delta, self.model.norm.weight, self.model.norm.eps)[1]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden `[B, D]` (or `[D]`) -> float32 logits `[B, V]`."""
        return linear(self.lm_head, hidden, self.batch_invariant and hidden.dim() == 2).float()

    @torch.inference_mode()
    def prefill(self, embeds: torch.Tensor, cache: KVCache, *, start: int, slot: int | None = None,
                table: Sequence[int] | None = None) -> torch.Tensor:
        """One sequence's positions `start..start+T-1`: embeds `[T, D]` -> last hidden `[D]`.

        The sequence's blocks are `table` (or slot `slot`'s of a `for_slots` cache). From position
        0 the chunk attends to itself (plain causal attention, as a whole-prompt forward does);
        later chunks attend to the cached prefix as well.
        """
        t = embeds.shape[0]
        device = embeds.device
        table = cache.slot_table(slot) if table is None else table
        bs = cache.block_size
        tables = cache.tables([table], -(-(start + t) // bs) * bs)  # [1, nblk]
        positions = torch.arange(start, start + t, device=device).unsqueeze(0)  # [1, T]
        write_at = cache.where(tables[0], positions[0])
        if self.attention_backend == "flash":  # over the cache, its causal mask aligned to the end
            step = Step(start=start, tables=tables.int(), write_at=write_at, backend="flash",
                        lengths=torch.tensor([start + t], dtype=torch.int32, device=device))
        else:
            mask = None
            if start:
                keys = torch.arange(start + t, device=device).view(1, -1)
                mask = (keys <= positions.view(t, 1)).view(1, 1, t, start + t)
            step = Step(start=start, tables=tables, write_at=write_at, mask=mask, causal=start == 0)
        return self._run(embeds.unsqueeze(0), positions, cache, step, start + t)[0, -1]

    @torch.inference_mode()
    def decode(self, embeds: torch.Tensor, positions: list[int], cache: KVCache,
               tables: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
        """One token for each of B sequences as one forward.

        embeds `[B, D]`, positions (where each new token goes, known on the host), block tables
        (default: slots 0..B-1 of a `for_slots` cache) -> hidden `[B, D]`.
        """
        b = embeds.shape[0]
        device = embeds.device
        if tables is None:
            tables = [cache.slot_table(i) for i in range(b)]
        lengths = [p + 1 for p in positions]
        bs = cache.block_size
        pos = torch.tensor(positions, device=device)
        if self.attention_backend == "cpu" and cache.k.device.type == "cpu" and cache.k.dtype == torch.float32:
            span = -(-max(lengths) // bs) * bs
            if cpu_decode.ready(self):  # the serving form: the same ops, without module dispatch
                return cpu_decode.decode_step(self, embeds, pos, cache.tables(tables, span), cache, span)
            table = cache.tables(tables, span)  # [B, blocks of the longest]
            step = Step(positions=pos, tables=table, per_row=self.batch_invariant, backend="cpu")
        elif self.attention_backend in ("triton", "flash"):
            span = -(-max(lengths) // bs) * bs
            table = cache.tables(tables, span)  # [B, blocks of the longest]
            step = self._paged_step(pos, table, cache)
        else:
            span = key_span(lengths, bs) if self.batch_invariant else -(-max(lengths) // bs) * bs
            table = cache.tables(tables, span)  # [B, span / block_size]
            bias = bucket_bias(lengths, span, cache.k.dtype, device)  # [B, 1, 1, span]
            step = Step(positions=pos, tables=table, write_at=cache.where(table, pos), per_row=self.batch_invariant,
                        pad=bias, mask=None if self.batch_invariant else bias)
        x, rope_pos = embeds.unsqueeze(1), pos.view(b, 1)
        if self.batch_invariant and not self.packed and b != padded_rows(b):
            # Pad once for the whole step (see `linear`): extra rows ride through the linears and
            # norms but never touch the cache or the attention. Packed weights need no padding:
            # oneDNN's rows are invariant at any count (a 1-row step computes 1 row, not 4).
            extra = padded_rows(b) - b
            x = torch.cat([x, x.new_zeros(extra, 1, x.shape[-1])])
            rope_pos = torch.cat([rope_pos, rope_pos.new_zeros(extra, 1)])
        return self._run(x, rope_pos, cache, step, span)[:b, 0]

    @torch.inference_mode()
    def decode_static(self, ids: torch.Tensor, positions: torch.Tensor, tables: torch.Tensor,
                      cache: KVCache) -> torch.Tensor:
        """The decode step with every shape fixed by (B, span) and no host sync, so that it can be
        captured in a CUDA graph and replayed with new ids, positions and tables (see
        `model.decode_graphs`).

        ids, positions `[B]` and block tables `[B, span / block_size]` on the device: row i feeds
        token ids[i] at positions[i] and attends to keys 0..positions[i] of its table (padding rows
        point at the null block). -> float32 logits `[B, V]`.
        """
        b, span = ids.shape[0], tables.shape[1] * cache.block_size
        if self.attention_backend in ("triton", "flash"):
            step = self._paged_step(positions, tables, cache)
            hidden = self._run(self.embed(ids).unsqueeze(1), positions.view(b, 1), cache, step, span)
            return self.lm_head(hidden[:, 0]).float()
        keys = torch.arange(span, device=ids.device)
        masked = (keys.view(1, -1) > positions.view(-1, 1)).view(b, 1, 1, span)
        # additive (0 / -inf), built once: a boolean mask would be converted again in every layer
        bias = torch.zeros(masked.shape, dtype=cache.k.dtype, device=ids.device).masked_fill_(masked, float("-inf"))
        step = Step(positions=positions, tables=tables, write_at=cache.where(tables, positions), mask=bias)
        hidden = self._run(self.embed(ids).unsqueeze(1), positions.view(b, 1), cache, step, span)
        return self.lm_head(hidden[:, 0]).float()


    def _paged_step(self, positions: torch.Tensor, tables: torch.Tensor, cache: KVCache) -> "Step":
        """A decode step through the Triton kernel (splits from shapes) or flash-attn (int32 tables
        and lengths, converted once a step): lengths on the device."""
        if self.attention_backend == "flash":
            return Step(positions=positions, tables=tables.int(), write_at=cache.where(tables, positions),
                        backend="flash", lengths=(positions + 1).int())
        splits = paged_attention_triton.default_splits(tables.shape[0], self.cfg.num_key_value_heads,
                                                       tables.shape[1] * cache.block_size)
        return Step(positions=positions, tables=tables, per_row=self.batch_invariant, lengths=positions + 1,
                    splits=splits, backend="triton")  # the kernel writes the new K/V (no write_at)


@dataclass
class Step:
    """Where one forward reads and writes the cache."""

    start: int = 0  # prefill: the chunk's first position
    positions: torch.Tensor | None = None  # decode: the new position of each real row `[B]`
    tables: torch.Tensor | None = None  # block tables `[B, nblk]` (prefill: `[1, nblk]`)
    write_at: tuple[torch.Tensor, torch.Tensor] | None = None  # blocks, offsets `[N]` of the new K/V
    mask: torch.Tensor | None = None  # boolean (True = attend) or additive
    causal: bool = False
    per_row: bool = False  # batch-invariant decode: row-invariant linears (packed, or padded to 4 rows)
    pad: torch.Tensor | None = None  # decode, batch-invariant: -inf on padding keys (see bucket_bias)
    # How this step attends (the model's backend): "sdpa" gathers; "cpu" (decode) has
    # `model.paged_attention_cpu` write and attend (no write_at, no gather); "triton" (decode: its
    # kernel writes the new K/V too, no write_at) and "flash" (decode and prefill) read the blocks
    # where they lie, up to `lengths`.
    backend: str = "sdpa"
    kernel: object = None  # cpu: the step's paged_attention_cpu.DecodeStep, made by the first layer
    lengths: torch.Tensor | None = None  # triton, flash: keys per row `[B]`, the new ones included
    splits: int = 1  # the Triton kernel's split-K factor
