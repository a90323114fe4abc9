"""Will the weights fit on the card? An estimate from the model's shapes (built on the meta
device), made before a single weight is read, so that a 70B model fails in a second with the
options spelled out instead of after minutes of loading with an out-of-memory error.

Weights only: the KV cache and the CUDA graphs come on top (the runner sizes those).
"""

from __future__ import annotations

import torch
from torch import nn

from .checkpoint import CheckpointError
from .quantization import LAYERS_PREFIX

GB = 1e9


def _quantized_bytes(numel: int, out_features: int, mode: str) -> float:
    if mode == "4bit":
        # nf4: half a byte per weight, plus bitsandbytes' compressed statistics: one 8-bit absmax
        # per block of 64 weights and a float32 per 256 blocks.
        return numel / 2 + numel / 64 + 4 * numel / (64 * 256)
    return numel + 4 * out_features  # int8 weights plus one float32 scale per row


def weight_bytes(model: nn.Module, dtype: torch.dtype, quantization: str = "none") -> int:
    """Bytes the loaded model's parameters and buffers take on the device."""
    total = 0.0
    quantized: set[str] = set()
    if quantization != "none":
        for name, module in model.named_modules():
            if name.startswith(LAYERS_PREFIX) and type(module) is nn.Linear:
                w = module.weight
                total += _quantized_bytes(w.numel(), w.shape[0], quantization)
                quantized.add(f"{name}.weight")
                if module.bias is not None:  # biases stay in the compute dtype
                    total += module.bias.numel() * dtype.itemsize
                    quantized.add(f"{name}.bias")
    for name, p in model.named_parameters():
        if name in quantized:
            continue
        # pos_embed keeps float16 whatever the model's dtype (see loading._load_weights)
        total += p.numel() * (torch.float16.itemsize if name.endswith("pos_embed") else dtype.itemsize)
    total += sum(b.numel() * b.element_size() for b in model.buffers())
    return int(total)


def check_fits(model: nn.Module, dtype: torch.dtype, quantization: str, *, free: int, total: int,
               device: str) -> None:
    """Raise CheckpointError naming the ways out when the weights exceed `free` bytes."""
    need = weight_bytes(model, dtype, quantization)
    if need <= free:
        return
    what = str(dtype).replace("torch.", "") if quantization == "none" else f"{quantization} weights"
    ways = []
    if quantization != "4bit":
        ways.append(f"--quantization 4bit (about {weight_bytes(model, dtype, '4bit') / GB:.0f} GB)")
    ways.append("a GPU with more free memory")
    raise CheckpointError(
        f"the model's weights need about {need / GB:.0f} GB ({what}) but {device} has {free / GB:.0f} GB free "
        f"of {total / GB:.0f} GB. Options: {'; '.join(ways)}. Splitting one model across several GPUs is not "
        "supported yet.")


def check_fits_on_device(model: nn.Module, dtype: torch.dtype, quantization: str, device: torch.device) -> None:
    if device.type != "cuda":
        return
    free, total = torch.cuda.mem_get_info(device)
    check_fits(model, dtype, quantization, free=free, total=total, device=str(device))
