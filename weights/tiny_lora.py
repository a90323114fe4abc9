"""A deterministic tiny LoRA checkpoint in the layout of SliME-Llama3-70B, and its tiny base.

    python -m weights.make_tiny --lora OUT [--lora-base BASE] [--seed N]

BASE (default: OUT-base) is a plain Llama checkpoint with the tokenizer, as Llama-3-70B-Instruct
is for the real one. OUT holds what the reference's LoRA training saves: `config.json` (the SliME
config), `adapter_config.json` and `adapter_model.safetensors` (peft's names:
`base_model.model.<module>.lora_A.weight` `[r, in]` and `.lora_B.weight` `[out, r]`), and
`non_lora_trainables.bin` (projector and local compressor under `base_model.model.model.*`,
without the frozen `pos_embed` tables, as training saves them), plus the CLIP tower. The merged
model is the tiny checkpoint of the same seed with every projection changed by its LoRA delta.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from .tiny_parts import TOWER_DIR, build_tiny_parts, save, write_tower

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK, ALPHA = 8, 16
BASE_CONFIG_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "rms_norm_eps", "rope_theta", "max_position_embeddings", "hidden_act",
              "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")


def adapter_config(base: str) -> dict:
    """What peft writes for LLaVA's LoraConfig (all-linear targets, no bias)."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": RANK,
            "lora_alpha": ALPHA, "lora_dropout": 0.05, "target_modules": list(TARGETS), "bias": "none",
            "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
            "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
            "use_rslora": False, "use_dora": False, "revision": None}


def _adapter_tensors(llm: dict[str, torch.Tensor], g: torch.Generator) -> dict[str, torch.Tensor]:
    out = {}
    for key, w in llm.items():
        module = key.removesuffix(".weight")
        if not module.endswith(TARGETS):
            continue
        rows, cols = w.shape
        # A as peft initialises it; B nonzero (as after training) and large enough that the
        # merged model answers differently from its base.
        out[f"base_model.model.{module}.lora_A.weight"] = torch.randn(RANK, cols, generator=g) * cols**-0.5
        out[f"base_model.model.{module}.lora_B.weight"] = torch.randn(rows, RANK, generator=g) * 0.1
    return out


def make_tiny_lora(out: str | Path, base: str | Path | None = None, *, template: str = "llama3",
                   seed: int = 0) -> tuple[Path, Path]:
    """Write the LoRA checkpoint to `out` and its base to `base` (each replaced atomically);
    returns both paths."""
    out = Path(out)
    base = Path(base) if base is not None else out.with_name(out.name + "-base")
    out.parent.mkdir(parents=True, exist_ok=True)
    base.parent.mkdir(parents=True, exist_ok=True)
    tmp_lora = Path(tempfile.mkdtemp(prefix=".tiny-lora-", dir=out.parent))
    tmp_base = Path(tempfile.mkdtemp(prefix=".tiny-base-", dir=base.parent))
    try:
        parts = build_tiny_parts(tmp_base, template=template, seed=seed)  # the tokenizer goes with the base
        cfg = parts.config
        llama = {k: cfg[k] for k in BASE_CONFIG_KEYS if k in cfg}
        llama.update({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "float32"})
        (tmp_base / "config.json").write_text(json.dumps(llama, indent=2))
        (tmp_base / "generation_config.json").write_text(json.dumps(parts.generation_config, indent=2))
        save(parts.llm, tmp_base, "safetensors")

        (tmp_lora / "config.json").write_text(json.dumps(cfg, indent=2))
        (tmp_lora / "adapter_config.json").write_text(json.dumps(adapter_config(str(base)), indent=2))
        _save_adapter(_adapter_tensors(parts.llm, parts.generator), tmp_lora)
        trainables = {"base_model.model." + k: v.contiguous() for k, v in parts.projector.items()
                      if not k.endswith("pos_embed")}
        torch.save(trainables, tmp_lora / "non_lora_trainables.bin")
        write_tower(parts.vision, tmp_lora / TOWER_DIR)
        (tmp_lora / "README.md").write_text(
            f"Random SliME LoRA checkpoint made by `python -m weights.make_tiny --lora` (seed {seed}, template "
            f"{template}); serve it with --model-base {base}. Its answers are random words.\n")
        for tmp, final in ((tmp_base, base), (tmp_lora, out)):
            tmp.chmod(0o755)
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp_lora, ignore_errors=True)
        shutil.rmtree(tmp_base, ignore_errors=True)
        raise
    return out, base


def _save_adapter(tensors: dict[str, torch.Tensor], directory: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "adapter_model.safetensors"),
              metadata={"format": "pt"})
