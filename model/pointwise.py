"""The decoder's elementwise and normalisation ops, eager or compiled.

At small decode batches a 7B step is bound by kernel count as much as by weight bytes. Besides its
4 GEMMs (q/k/v fused, o, gate/up fused, down), 2 KV-cache writes and attention, a decoder layer
(`LlamaForCausalLM._run`) launches these ops, counted per layer in the code below:

- the reference's own ops: 25 (each RMSNorm 8, residual adds 2, RoPE 5, SiLU and the multiply 2);
  on the CPU in float32 RMSNorm is torch's one op (bit-equal) and decode RoPE runs inside
  `model.paged_attention_cpu`'s loop;
- the eager CUDA forms: 9 (RMSNorm as one kernel, residual adds 2, RoPE in 3, SiLU and multiply 2);
- `PointwiseKernels.make_compiled()` (CUDA, the server's default): 4 generated kernels
  (torch.compile), one per op group: the residual add with the next RMSNorm (twice), RoPE, SiLU
  times up.

So a CUDA layer is 11 ops compiled, 16 eager. Some ops launch more than one kernel (cuBLAS, SDPA):
`python -m bench.gpu --profile` measures the device ops of a whole 7B step (BENCHMARKS.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.is_cuda:  # one kernel (the weight applied before rounding, as vLLM's kernel does)
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        # torch's CPU op computes the reference's float32 arithmetic (bit for bit, tested) in one call
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    dtype = x.dtype  # the CPU: the reference's own ops, bit for bit what transformers computes
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual stream after adding a sublayer's output (`delta`, None for the first) and the
    next sublayer's normalised input: `(x + delta, RMSNorm(x + delta))`."""
    if delta is not None:
        x = x + delta
    return x, rms_norm(x, weight, eps)


def _reference_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float):
    """add_rms_norm in the reference's ops, for torch.compile to fuse into one kernel."""
    if delta is not None:
        x = x + delta
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return x, weight * h.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The reference's RoPE: 5 kernels eager."""
    return (x * cos) + (rotate_half(x) * sin)


def rope_rolled(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """RoPE in 3 kernels: rotate_half(x) * sin == roll(x) * sin with its first half negated."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin_signed)


def sign_fold(sin: torch.Tensor) -> torch.Tensor:
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


@dataclass(frozen=True)
class PointwiseKernels:
    add_rms_norm: Callable = add_rms_norm
    rope: Callable | None = None  # None: `rope` on the CPU, `rope_rolled` on CUDA
    silu_mul: Callable = silu_mul
    compiled: bool = False

    @classmethod
    def make_compiled(cls) -> "PointwiseKernels":
        """The torch.compile'd forms (`dynamic=True`) of the reference's ops: residual add + RMSNorm
        (`_reference_rms_norm`, so the weight multiplies after rounding, as the reference does, not
        before as the eager CUDA `rms_norm`), RoPE (`rope`, unrolled sin) and SiLU times up, one
        generated kernel each.

        Nothing compiles here: each variant compiles at its first call (the engine's warm-up calls
        every shape serving uses). Shapes are dynamic, but sizes 0/1, storage offsets and inference
        vs normal tensors each make another variant, so this raises dynamo's process-wide
        `recompile_limit` to at least 64 (default 8); past the limit a call runs eagerly rather
        than failing (no `fullgraph`)."""
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)

        def comp(fn):
            return torch.compile(fn, dynamic=True)

        return cls(add_rms_norm=comp(_reference_rms_norm), rope=comp(rope), silu_mul=comp(silu_mul), compiled=True)


class Rotary:
    """RoPE for one forward: cos, sin `[B, 1, T, hd]` gathered once, applied in every layer."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor, kernel: Callable | None = None,
                 rolled: bool | None = None):
        self.cos, self.sin, self.kernel = cos, sin, kernel or rope
        if kernel is None and (cos.is_cuda if rolled is None else rolled):
            self.sin, self.kernel = sign_fold(sin), rope_rolled

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel(x, self.cos, self.sin)
