"""How the LLM runs, decided once at load (`choose`) from the attention backend asked for, the
device, the dtype and the quantization: how it attends, whether rows are batch-invariant, whether
its weights are fused or packed, whether decode can be replayed as CUDA graphs. The model applies
the decision (`LlamaForCausalLM.configure`); the runner reads it and decides none of it again.

Attention backends: "cpu" (`model.paged_attention_cpu`, numba: CPU float32 decode reads the
blocks in place), "triton" (`model.paged_attention_triton`: decode reads the blocks in place; CUDA,
or the CPU under TRITON_INTERPRET=1), "flash" (`model.paged_attention_flash`: flash-attn's paged
path for decode and every prompt chunk; CUDA, half precision, 256-position blocks), "sdpa" (decode
gathers each sequence's blocks into a padded copy; anything). Prompt chunks attend through SDPA
with every backend but flash.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

ATTENTION_BACKENDS = ("cpu", "triton", "flash", "sdpa")
# Backends whose rows do not depend on the batch: the Triton and flash kernels split keys by the
# batch's shape, so their rows may round differently at another batch size.
ROW_INVARIANT = ("cpu", "sdpa")


@dataclass(frozen=True)
class Execution:
    attention: str = "sdpa"  # one of ATTENTION_BACKENDS
    auto: bool = False  # chosen by "auto": a kernel failing its warm-up gives way (flash -> triton -> sdpa)
    batch_invariant: bool = False  # CPU float32: a row's results never depend on the rest of the batch
    pack: bool = False  # CPU float32: every projection through oneDNN-packed weights
    fuse: bool = False  # q/k/v and gate/up as one GEMM each (unquantized weights)
    cuda_graphs: bool = False  # decode may be replayed as CUDA graphs (CUDA, unquantized)

    @property
    def gathers(self) -> bool:
        """Decode copies each sequence's blocks into a padded buffer (memory to set aside)."""
        return self.attention == "sdpa"

    def block_size(self, requested: int) -> int:
        """The KV-cache block size this execution takes at or above `requested`."""
        if self.attention == "flash":
            from . import paged_attention_flash

            return paged_attention_flash.block_size(requested)
        return requested

    def with_attention(self, attention: str) -> Execution:
        """Attending through `attention` instead (a fallback, or a test): batch invariance stays
        only where the new backend keeps rows invariant."""
        return replace(self, attention=attention, batch_invariant=self.batch_invariant and attention in ROW_INVARIANT)


def choose(choice: str, device: torch.device, dtype: torch.dtype, quantization: str = "none",
           flash_allowed: bool = True) -> Execution:
    """The execution for backend `choice` (or "auto": the fastest available here) on this device,
    dtype and quantization. ValueError for a backend this device or dtype cannot run."""
    cpu32 = device.type == "cpu" and dtype == torch.float32 and quantization == "none"
    attention = _attention(choice, device, dtype, cpu32, flash_allowed)
    return Execution(attention=attention, auto=choice == "auto", batch_invariant=cpu32 and attention in ROW_INVARIANT,
                     pack=cpu32, fuse=quantization == "none",
                     cuda_graphs=device.type == "cuda" and quantization == "none")


def _attention(choice: str, device: torch.device, dtype: torch.dtype, cpu32: bool, flash_allowed: bool) -> str:
    """`choice`, or for "auto": the numba kernel for CPU float32; on CUDA flash-attn's paged path
    in half precision where it is installed and runs (and is allowed), else the Triton kernel;
    else gather + SDPA."""
    from . import paged_attention_cpu, paged_attention_flash, paged_attention_triton

    if choice not in ("auto", *ATTENTION_BACKENDS):
        raise ValueError(f"unknown attention backend {choice!r} (auto, {', '.join(ATTENTION_BACKENDS)})")
    half = dtype in (torch.float16, torch.bfloat16)
    if choice == "flash" and not (device.type == "cuda" and half):
        raise ValueError("the flash attention backend needs a CUDA device and float16/bfloat16")
    if choice != "auto":
        return choice
    if cpu32 and paged_attention_cpu.available():
        return "cpu"
    if device.type == "cuda" and half and flash_allowed and paged_attention_flash.runs_on(device):
        return "flash"
    if device.type == "cuda" and paged_attention_triton.available():
        return "triton"
    return "sdpa"
