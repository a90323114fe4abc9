"""LoRA checkpoints in the LLaVA layout (SliME-Llama3-70B), merged while their tensors are read.

Such a directory holds `config.json` (the SliME config), `adapter_config.json`,
`adapter_model.safetensors` (or `.bin`) and `non_lora_trainables.bin` (projector, mixture of
adapters, local compressor); the LLM's weights are those of a base model found elsewhere (the
reference loader's `model_base`). `LoraSource` serves, one tensor at a time, what the reference
builds from them (`load_pretrained_model` with a model base, then peft's `merge_and_unload`):

- every base tensor under its own name;
- the non-LoRA trainables, renamed as the reference renames them, in place of base tensors of the
  same name (its `load_state_dict(strict=False)`);
- each targeted linear merged: W' = W + (B @ A) * scale, with W `[out, in]`, A = lora_A `[r, in]`,
  B = lora_B `[out, r]` and scale = alpha / r (alpha / sqrt(r) with rslora), in float32.

So a 70B model is never held twice: each weight is read, merged and handed over on its own.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .checkpoint import CheckpointError, TensorSource, weight_files

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
NON_LORA_FILE = "non_lora_trainables.bin"
ADAPTER_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the wrapped model
VISION_MODULES = "model.vision_tower."  # module names under the vision tower (not weight keys)
# adapter_config.json options that change what a merge means; refused when set rather than ignored.
UNSUPPORTED_LORA_KEYS = ("use_dora", "modules_to_save", "layers_to_transform", "layer_replication", "lora_bias",
               "target_parameters", "trainable_token_indices", "exclude_modules", "use_qalora",
               "alora_invocation_tokens", "use_bdlora")


def is_lora_checkpoint(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).exists()


def base_model_name(path: str | Path) -> str | None:
    """`base_model_name_or_path` of a LoRA checkpoint's adapter config (what it was trained on)."""
    try:
        return json.loads((Path(path) / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError):
        return None


def missing_base_message(path: str | Path) -> str:
    name = base_model_name(path)
    named = f"adapter_config.json names {name!r}" if name else "adapter_config.json does not name it"
    return (f"{path} is a LoRA checkpoint: it needs its base model ({named}). Pass the base model's "
            "directory with --model-base (SLIME_MODEL_BASE), or merge the two once with "
            "`python -m weights.merge_lora` and serve the result")


@dataclass(frozen=True)
class LoraConfig:
    """What `adapter_config.json` says about the merge, with peft's semantics."""

    r: int
    alpha: float
    target_modules: tuple[str, ...] | str  # names matched as module-name suffixes, or one full-match regex
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    base_model: str | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LoraConfig":
        if d.get("peft_type", "LORA") != "LORA":
            raise CheckpointError(f"adapter_config.json: peft_type {d.get('peft_type')!r} is not LORA")
        refused = [k for k in UNSUPPORTED_LORA_KEYS if d.get(k)]
        if d.get("bias", "none") != "none":
            refused.append(f"bias={d['bias']!r}")
        if refused:
            raise CheckpointError(f"adapter_config.json uses {', '.join(refused)}: not supported (plain LoRA, "
                                  "optionally rslora, rank_pattern and alpha_pattern, is)")
        targets = d.get("target_modules")
        if not targets:
            raise CheckpointError("adapter_config.json names no target_modules")
        if d.get("fan_in_fan_out"):
            # peft resets it for torch.nn.Linear targets (every Llama projection), so it has no effect.
            log.warning("adapter_config.json sets fan_in_fan_out, which peft ignores for Linear layers: ignored")
        return cls(r=int(d["r"]), alpha=float(d.get("lora_alpha", 8)),
                   target_modules=targets if isinstance(targets, str) else tuple(targets),
                   use_rslora=bool(d.get("use_rslora")), rank_pattern=dict(d.get("rank_pattern") or {}),
                   alpha_pattern=dict(d.get("alpha_pattern") or {}), base_model=d.get("base_model_name_or_path"))

    def targets(self, module: str) -> bool:
        """Whether peft wraps `module` (a dotted name such as `model.layers.0.self_attn.q_proj`)."""
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, module) is not None
        return module in self.target_modules or any(module.endswith("." + t) for t in self.target_modules)

    def rank(self, module: str) -> int:
        return int(self.rank_pattern.get(_pattern_key(self.rank_pattern, module), self.r))

    def scale(self, module: str) -> float:
        alpha = float(self.alpha_pattern.get(_pattern_key(self.alpha_pattern, module), self.alpha))
        r = self.rank(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _pattern_key(patterns: dict, module: str) -> str | None:
    """The first pattern that matches the end of `module` at a name boundary (peft's rule)."""
    return next((k for k in patterns if re.match(rf"(.*\.)?({k})$", module)), None)


def reference_rename(keys: list[str]) -> dict[str, str]:
    """non_lora_trainables names -> checkpoint names, as the reference loader renames them: strip
    `base_model.` from each key, then, when any key starts with `model.model.`, strip one
    `model.` from every key that starts with it."""
    step = {(k[len("base_model."):] if k.startswith("base_model.") else k): k for k in keys}
    if any(k.startswith("model.model.") for k in step):
        step = {(k[len("model."):] if k.startswith("model.") else k): v for k, v in step.items()}
    return step


def merge_delta(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """W `[out, in]` + (B `[out, r]` @ A `[r, in]`) * scale, in float32 -> float32 `[out, in]`.

    The operations are peft's (product, scaling, then the sum; float addition commutes), so
    float32 inputs give its bits exactly. In place on the product: one float32 `[out, in]`
    buffer, whatever W's dtype."""
    out = lora_b.float() @ lora_a.float()
    out.mul_(scale)
    return out.add_(weight)


def llm_linear_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Checkpoint key -> shape `[out, in]` of every linear weight of the LLM (the modules an
    adapter may target; the LLM's parameter names are the checkpoint's)."""
    llm = model.llm  # type: ignore[attr-defined]
    return {f"{name}.weight": tuple(m.weight.shape) for name, m in llm.named_modules() if isinstance(m, nn.Linear)}


class LoraSource:
    """The `TensorSource` interface over base model + non-LoRA trainables + adapter (see the
    module docstring). Merged tensors come back in float32, ready to be cast to the target dtype."""

    origin = " (in neither the base model nor non_lora_trainables.bin)"

    def __init__(self, lora_dir: str | Path, base_dir: str | Path, *, merge_device: torch.device | None = None):
        self.lora_dir, self.base_dir = Path(lora_dir), Path(base_dir)
        # Where merges run: the loading GPU when there is one (a 70B model has 560 of them; on a
        # CPU they add minutes to the start), else the CPU.
        self.merge_device = merge_device or torch.device("cpu")
        try:
            cfg = json.loads((self.lora_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{self.lora_dir / ADAPTER_CONFIG}: {e}") from e
        self.config = LoraConfig.from_dict(cfg)
        if not self.base_dir.is_dir():
            raise CheckpointError(f"base model {self.base_dir} is not a directory (--model-base)")
        try:
            base_files = weight_files(self.base_dir)
        except FileNotFoundError as e:
            raise CheckpointError(f"base model: {e}") from e
        adapter = next((self.lora_dir / n for n in ADAPTER_FILES if (self.lora_dir / n).exists()), None)
        if adapter is None:
            raise CheckpointError(f"{self.lora_dir} has no adapter weights ({' or '.join(ADAPTER_FILES)})")
        self._base = TensorSource(base_files)
        self._adapter = TensorSource([adapter])
        self._fresh: dict[str, torch.Tensor] = {}
        extra_path = self.lora_dir / NON_LORA_FILE
        self.has_trainables = extra_path.exists()
        self._extra = TensorSource([extra_path]) if self.has_trainables else None
        names = reference_rename(self._extra.keys()) if self._extra is not None else {}
        # The reference builds the vision tower from `mm_vision_tower` after this state dict is
        # loaded (its tower is not built yet when it is), so tower keys here never take effect.
        self._extra_names = {k: v for k, v in names.items() if not k.startswith(VISION_MODULES)}
        self.pairs: dict[str, tuple[str, str]] = {}  # weight key -> (lora_A key, lora_B key)
        self.stray: list[str] = []  # adapter keys that are not half of a lora_A / lora_B pair
        halves: dict[str, dict[str, str]] = {}
        for key in self._adapter.keys():
            module, _, tail = key.removeprefix(ADAPTER_PREFIX).rpartition(".lora_")
            if not key.startswith(ADAPTER_PREFIX) or tail not in ("A.weight", "B.weight"):
                self.stray.append(key)
                continue
            halves.setdefault(module, {})[tail[0]] = key
        for module, ab in halves.items():
            if len(ab) == 2:
                self.pairs[module + ".weight"] = (ab["A"], ab["B"])
            else:
                self.stray.extend(ab.values())

    # -- the TensorSource interface --------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(dict.fromkeys([*self._base.keys(), *self._extra_names, *self._fresh]))

    def __contains__(self, key: str) -> bool:
        return key in self._fresh or key in self._extra_names or key in self._base

    def _where(self, key: str) -> tuple[TensorSource | None, str]:
        if key in self._extra_names:
            return self._extra, self._extra_names[key]
        return (None, key) if key in self._fresh else (self._base, key)

    def shape(self, key: str) -> tuple[int, ...]:
        src, name = self._where(key)
        return tuple(self._fresh[key].shape) if src is None else src.shape(name)

    def dtype(self, key: str) -> torch.dtype:
        """The stored dtype (a merged weight comes back from `get` in float32 whatever it is)."""
        src, name = self._where(key)
        return self._fresh[key].dtype if src is None else src.dtype(name)

    def dtype_name(self, key: str) -> str:
        return str(self.dtype(key)).replace("torch.", "")

    def get(self, key: str) -> torch.Tensor:
        src, name = self._where(key)
        tensor = self._fresh[key] if src is None else src.get(name)
        pair = self.pairs.get(key)
        if pair is None:
            return tensor
        module = key[: -len(".weight")]
        a, b = (self._adapter.get(k).to(self.merge_device) for k in pair)
        return merge_delta(tensor.to(self.merge_device), a, b, self.config.scale(module))

    def items_with_prefix(self, prefix: str) -> Iterator[str]:
        return (k for k in self.keys() if k.startswith(prefix))

    def close(self) -> None:
        for src in (self._base, self._adapter, self._extra):
            if src is not None:
                src.close()

    def __enter__(self) -> "LoraSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- what the reference fills in itself, and what does not fit -----------------------------
    def add_fresh_pos_embeds(self, model: nn.Module) -> list[str]:
        """The Resamplers' `pos_embed` is frozen in training, so non_lora_trainables.bin (which
        keeps trainable tensors only) may lack it; the reference then keeps the value its module
        is built with: the sin-cos table rounded to float16. Returns the keys filled in."""
        from .local_compressor import sincos_pos_embed_2d

        params = dict(model.named_parameters())
        filled = []
        for ours, key in model.checkpoint_names().items():  # type: ignore[operator]
            if key.endswith("pos_embed") and key not in self:
                n, dim = params[ours].shape
                table = sincos_pos_embed_2d(dim, math.isqrt(n))
                self._fresh[key] = torch.from_numpy(table).to(torch.float16)
                filled.append(key)
        return filled

    def problems(self, linear_shapes: dict[str, tuple[int, ...]]) -> list[str]:
        """Everything that keeps the adapter from fitting this model (empty: it fits).
        `linear_shapes` is `llm_linear_shapes(model)`."""
        out = []
        if not self.has_trainables:
            out.append(f"{NON_LORA_FILE} is missing from {self.lora_dir}: it holds the projector, the mixture "
                       "of adapters and the local compressor")
        unused = list(self.stray)
        misshaped = []
        for key, (a_key, b_key) in self.pairs.items():
            module = key[: -len(".weight")]
            if key not in linear_shapes or not self.config.targets(module):
                unused += [a_key, b_key]
                continue
            out_f, in_f = self.shape(key) if key in self else linear_shapes[key]
            r = self.config.rank(module)
            a, b = self._adapter.shape(a_key), self._adapter.shape(b_key)
            if a != (r, in_f) or b != (out_f, r):
                misshaped.append(f"{module}: lora_A {list(a)}, lora_B {list(b)}; base weight [{out_f}, {in_f}] "
                                 f"and rank {r} want lora_A [{r}, {in_f}], lora_B [{out_f}, {r}]")
        if unused:
            out.append(f"unused adapter keys ({len(unused)}; not a lora_A/lora_B pair of a targeted linear of "
                       f"this model): {', '.join(sorted(unused)[:10])}{' ...' if len(unused) > 10 else ''}")
        if misshaped:
            out.append(f"adapter and base disagree on shapes or rank ({len(misshaped)}): "
                       f"{'; '.join(misshaped[:5])}{' ...' if len(misshaped) > 5 else ''}")
        uncovered = [k for k in linear_shapes if self.config.targets(k[: -len(".weight")]) and k not in self.pairs]
        if uncovered:
            out.append(f"the adapter has no weights for {len(uncovered)} targeted module(s) (a different base or "
                       f"a truncated adapter?): {', '.join(uncovered[:10])}{' ...' if len(uncovered) > 10 else ''}")
        return out


def open_weights(path: Path, model_base: str | Path | None, *,
                 merge_device: torch.device | None = None) -> TensorSource | LoraSource:
    """The tensors of checkpoint `path`: its own files, or for a LoRA checkpoint the merge with
    `model_base` (required then, refused otherwise)."""
    if is_lora_checkpoint(path):
        if model_base is None:
            raise CheckpointError(missing_base_message(path))
        return LoraSource(path, model_base, merge_device=merge_device)
    if model_base is not None:
        raise CheckpointError(f"a base model was given (--model-base {model_base}) but {path} is not a LoRA "
                              f"checkpoint (it has no {ADAPTER_CONFIG})")
    return TensorSource(weight_files(path))
