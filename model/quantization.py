"""bitsandbytes 8-bit and 4-bit (nf4) weights for the LLM's linear layers (not lm_head)."""

from __future__ import annotations

import torch
from torch import nn


def _bnb():
    try:
        import bitsandbytes as bnb
    except ImportError as e:  # pragma: no cover - depends on the install
        raise RuntimeError("quantization needs bitsandbytes: pip install 'slime-serve[quant]'") from e
    return bnb


def quantize_llm(llm: nn.Module, mode: str, *, compute_dtype: torch.dtype, device: torch.device) -> int:
    """Replace every `nn.Linear` inside the decoder layers in place; returns how many were replaced."""
    if mode not in ("8bit", "4bit"):
        raise ValueError(f"unknown quantization {mode!r} (none, 8bit, 4bit)")
    bnb = _bnb()
    replaced = 0
    for layer in llm.model.layers:
        for parent in layer.modules():
            for name, child in list(parent.named_children()):
                if type(child) is not nn.Linear:
                    continue
                weight = child.weight.data.to("cpu", torch.float16 if compute_dtype == torch.float32 else compute_dtype)
                bias = child.bias
                if mode == "8bit":
                    q = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=bias is not None,
                                            has_fp16_weights=False, threshold=6.0)
                    q.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
                else:
                    q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=bias is not None,
                                          compute_dtype=compute_dtype, quant_type="nf4")
                    q.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
                if bias is not None:
                    q.bias = nn.Parameter(bias.data.to(compute_dtype), requires_grad=False)
                q = q.to(device)  # quantises the weight on its way to the device
                setattr(parent, name, q)
                replaced += 1
    return replaced
