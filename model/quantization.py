"""bitsandbytes 8-bit and 4-bit (nf4) weights for the LLM's linear layers (not lm_head)."""

from __future__ import annotations

import torch
from torch import nn

LAYERS_PREFIX = "llm.model.layers."  # decoder layers, as SliMEForCausalLM names them


def _bnb():
    try:
        import bitsandbytes as bnb
    except ImportError as e:  # pragma: no cover - depends on the install
        raise RuntimeError("quantization needs bitsandbytes: pip install 'slime-serve[quant]'") from e
    return bnb


BNB_CPU_PACK_ROWS = 32  # bitsandbytes' AVX512-BF16 4-bit CPU layout packs output rows in blocks of this


def quantize_layer(layer: nn.Module, mode: str, *, compute_dtype: torch.dtype, device: torch.device) -> int:
    """Replace every `nn.Linear` inside one decoder layer in place; returns how many were replaced."""
    if mode not in ("8bit", "4bit"):
        raise ValueError(f"unknown quantization {mode!r} (none, 8bit, 4bit)")
    bnb = _bnb()
    replaced = 0
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
                if child.out_features % BNB_CPU_PACK_ROWS or child.in_features % q.weight.blocksize:
                    # bitsandbytes repacks 4-bit weights for AVX512-BF16 CPUs at the first forward,
                    # which fails unless rows come in blocks of 32 and each row in whole quantization
                    # blocks: keep its plain kernel for such layers
                    q.support_avx512bf16_for_cpu = False
            if bias is not None:
                q.bias = nn.Parameter(bias.data.to(compute_dtype), requires_grad=False)
            q = q.to(device)  # quantises the weight on its way to the device
            setattr(parent, name, q)
            replaced += 1
    return replaced


def quantize_llm(llm: nn.Module, mode: str, *, compute_dtype: torch.dtype, device: torch.device) -> int:
    """Quantize every decoder layer of a loaded LLM in place; returns how many linears were replaced."""
    return sum(quantize_layer(layer, mode, compute_dtype=compute_dtype, device=device) for layer in llm.model.layers)


class LayerQuantizer:
    """Quantizes each decoder layer as soon as its linears are loaded, while loading.

    The linears' full-precision weights are staged in host memory and only their quantized form
    goes to the device: a 70B LLM is ~140 GB in bf16 but ~40 GB in 4-bit, so it must never sit on
    the card whole in bf16. Quantizing happens after any LoRA merge (the merged tensor is what
    gets loaded). Parameter names are SliMEForCausalLM's (`llm.model.layers.{i}...`).
    """

    def __init__(self, model: nn.Module, mode: str, *, compute_dtype: torch.dtype, device: torch.device):
        if mode not in ("8bit", "4bit"):
            raise ValueError(f"unknown quantization {mode!r} (none, 8bit, 4bit)")
        _bnb()  # fail before reading any weight
        self.model, self.mode, self.compute_dtype, self.device = model, mode, compute_dtype, device
        self.pending: dict[int, set[str]] = {}
        for name, module in model.named_modules():
            if name.startswith(LAYERS_PREFIX) and type(module) is nn.Linear:
                layer = int(name[len(LAYERS_PREFIX):].split(".")[0])
                self.pending.setdefault(layer, set()).update(f"{name}.{p}" for p, _ in module.named_parameters())

    def stages(self, name: str) -> bool:
        """Whether parameter `name` should be loaded to the CPU (it will be quantized)."""
        layer = self._layer(name)
        return layer is not None and name in self.pending.get(layer, ())

    def loaded(self, name: str) -> None:
        """Parameter `name` is in place; quantize its layer once the layer's linears all are."""
        layer = self._layer(name)
        if layer is None or layer not in self.pending:
            return
        self.pending[layer].discard(name)
        if not self.pending[layer]:
            del self.pending[layer]
            quantize_layer(self.model.llm.model.layers[layer], self.mode, compute_dtype=self.compute_dtype,
                           device=self.device)

    @staticmethod
    def _layer(name: str) -> int | None:
        if not name.startswith(LAYERS_PREFIX):
            return None
        return int(name[len(LAYERS_PREFIX):].split(".")[0])
