"""The parts of the tiny SliME checkpoint (random weights in the official layout): the LLM, projector
and vision tensors, the config, the tokenizer, and writing them. `weights.make_tiny` assembles a
full checkpoint from them, `weights.tiny_lora` a LoRA one."""


from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from model.local_compressor import sincos_pos_embed_2d

from .tiny_tokenizer import build_llama3, build_sentencepiece

TOWER_DIR = "clip-vit-tiny-patch14-336"
VISION = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
          "image_size": 336, "patch_size": 14, "layer_norm_eps": 1e-5, "hidden_act": "quick_gelu",
          "num_channels": 3, "projection_dim": 128, "model_type": "clip_vision_model"}
# What openai/clip-vit-large-patch14-336 ships.
PREPROCESSOR = {"crop_size": {"height": 336, "width": 336}, "do_center_crop": True, "do_normalize": True,
                "do_resize": True, "image_processor_type": "CLIPImageProcessor",
                "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
                "resample": 3, "size": {"shortest_edge": 336}}
LLM = {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4,
       "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 4096}
# LLM shapes by --size: tiny for tests (all overhead); small (~20M parameters: hidden 512, 6 layers,
# 8 heads of 64, 4 KV heads) and medium (~100M) for benchmarks where the compute is real work.
SIZES = {
    "tiny": LLM,
    "small": {**LLM, "hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 6, "num_attention_heads": 8,
              "num_key_value_heads": 4},
    "medium": {**LLM, "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8,
               "num_attention_heads": 16, "num_key_value_heads": 8},
}


def _vision_tensors(g: torch.Generator) -> dict[str, torch.Tensor]:
    d, i, p = VISION["hidden_size"], VISION["intermediate_size"], VISION["patch_size"]
    n_pos = (VISION["image_size"] // p) ** 2 + 1

    def rnd(*shape, std):
        return torch.randn(*shape, generator=g) * std

    t = {"vision_model.embeddings.class_embedding": rnd(d, std=0.5),
         "vision_model.embeddings.patch_embedding.weight": rnd(d, 3, p, p, std=0.05),
         "vision_model.embeddings.position_embedding.weight": rnd(n_pos, d, std=0.3),
         "vision_model.pre_layrnorm.weight": 1 + rnd(d, std=0.1), "vision_model.pre_layrnorm.bias": rnd(d, std=0.1),
         "vision_model.post_layernorm.weight": torch.ones(d), "vision_model.post_layernorm.bias": torch.zeros(d)}
    for layer in range(VISION["num_hidden_layers"]):
        pre = f"vision_model.encoder.layers.{layer}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            t[pre + f"self_attn.{name}.weight"] = rnd(d, d, std=d**-0.5)
            t[pre + f"self_attn.{name}.bias"] = rnd(d, std=0.02)
        t[pre + "mlp.fc1.weight"], t[pre + "mlp.fc1.bias"] = rnd(i, d, std=d**-0.5), rnd(i, std=0.02)
        t[pre + "mlp.fc2.weight"], t[pre + "mlp.fc2.bias"] = rnd(d, i, std=i**-0.5), rnd(d, std=0.02)
        for ln in ("layer_norm1", "layer_norm2"):
            t[pre + f"{ln}.weight"], t[pre + f"{ln}.bias"] = 1 + rnd(d, std=0.1), rnd(d, std=0.05)
    return t


def _resampler_tensors(prefix: str, grid: int, dim: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    def rnd(*shape, std):
        return torch.randn(*shape, generator=g) * std

    return {prefix + "pos_embed": torch.from_numpy(sincos_pos_embed_2d(dim, grid)).to(torch.float16),
            prefix + "query": rnd(grid * grid, dim, std=0.5),
            prefix + "attn.in_proj_weight": rnd(3 * dim, dim, std=dim**-0.5),
            prefix + "attn.in_proj_bias": rnd(3 * dim, std=0.02),
            prefix + "attn.out_proj.weight": rnd(dim, dim, std=dim**-0.5),
            prefix + "attn.out_proj.bias": rnd(dim, std=0.02),
            **{prefix + f"{ln}.weight": 1 + rnd(dim, std=0.1) for ln in ("ln_q", "ln_kv", "ln_post")},
            **{prefix + f"{ln}.bias": rnd(dim, std=0.1) for ln in ("ln_q", "ln_kv", "ln_post")}}


def _llm_tensors(vocab: int, g: torch.Generator, llm: dict) -> dict[str, torch.Tensor]:
    d, i = llm["hidden_size"], llm["intermediate_size"]
    hd = d // llm["num_attention_heads"]
    kv = llm["num_key_value_heads"] * hd

    def rnd(*shape, std):
        return torch.randn(*shape, generator=g) * std

    # A shared direction in every token embedding makes the text embeddings agree with each other,
    # so the cosine scores of local tokens spread out and the selector keeps a strict subset.
    common = rnd(d, std=1.0)
    t = {"model.embed_tokens.weight": rnd(vocab, d, std=1.0) + common,
         "model.norm.weight": 1 + rnd(d, std=0.1), "lm_head.weight": rnd(vocab, d, std=d**-0.5 * 4)}
    for layer in range(llm["num_hidden_layers"]):
        pre = f"model.layers.{layer}."
        t[pre + "self_attn.q_proj.weight"] = rnd(d, d, std=d**-0.5)
        t[pre + "self_attn.k_proj.weight"] = rnd(kv, d, std=d**-0.5)
        t[pre + "self_attn.v_proj.weight"] = rnd(kv, d, std=d**-0.5)
        t[pre + "self_attn.o_proj.weight"] = rnd(d, d, std=d**-0.5)
        t[pre + "mlp.gate_proj.weight"] = rnd(i, d, std=d**-0.5)
        t[pre + "mlp.up_proj.weight"] = rnd(i, d, std=d**-0.5)
        t[pre + "mlp.down_proj.weight"] = rnd(d, i, std=i**-0.5)
        t[pre + "input_layernorm.weight"] = 1 + rnd(d, std=0.1)
        t[pre + "post_attention_layernorm.weight"] = 1 + rnd(d, std=0.1)
    return t


def _projector_tensors(kind: str, g: torch.Generator, d: int) -> dict[str, torch.Tensor]:
    dv = VISION["hidden_size"]

    def rnd(*shape, std):
        return torch.randn(*shape, generator=g) * std

    if kind == "linear":
        return {"model.mm_projector.weight": rnd(d, dv, std=dv**-0.5 * 4), "model.mm_projector.bias": rnd(d, std=0.1)}
    two = {"0.weight": rnd(d, dv, std=dv**-0.5 * 2), "0.bias": rnd(d, std=0.1),
           "2.weight": rnd(d, d, std=d**-0.5 * 4), "2.bias": rnd(d, std=0.1)}
    if kind == "mlp2x_gelu":
        return {f"model.mm_projector.{k}": v for k, v in two.items()}
    t = {f"model.mm_projector.projection.{k}": v for k, v in two.items()}
    t.update(_resampler_tensors("model.mm_projector.attn.", 24, dv, g))
    t["model.mm_projector.w_gate"] = rnd(dv, 2, std=0.3)
    t["model.mm_projector.w_noise"] = torch.zeros(dv, 2)
    t["model.mm_projector.mean"] = torch.tensor([0.0])
    t["model.mm_projector.std"] = torch.tensor([1.0])
    t.update(_resampler_tensors("model.sampler.post_qformer.", 12, dv, g))
    return t


def save(tensors: dict[str, torch.Tensor], out: Path, fmt: str) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if fmt == "safetensors":
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    elif fmt == "bin":
        torch.save(tensors, str(out / "pytorch_model.bin"))
    elif fmt == "sharded":
        keys = sorted(tensors)
        shards = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
        weight_map = {}
        for n, shard in enumerate(shards, 1):
            name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
            save_file({k: tensors[k] for k in shard}, str(out / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(v.numel() * v.element_size() for v in tensors.values())
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    else:
        raise ValueError(f"unknown format {fmt!r}")


@dataclass
class TinyParts:
    """Everything a tiny checkpoint holds but its tokenizer (already written to the directory)."""

    llm: dict[str, torch.Tensor]  # model.embed_tokens / model.layers / model.norm / lm_head
    projector: dict[str, torch.Tensor]  # model.mm_projector.* and model.sampler.*
    vision: dict[str, torch.Tensor]  # the CLIP tower's own names
    config: dict
    generation_config: dict
    generator: torch.Generator  # where the draws stopped, for callers that draw more


def build_tiny_parts(tok_dir: Path, *, template: str = "vicuna_v1", seed: int = 0, projector: str = "gated",
                     size: str = "tiny") -> TinyParts:
    """Train the tokenizer into `tok_dir` and draw the weights (always in the same order, so a
    seed gives the same tensors whatever is built from them)."""
    llm = SIZES[size]
    if template == "vicuna_v1":
        build_sentencepiece(tok_dir, seed=seed)
    elif template == "llama3":
        build_llama3(tok_dir, seed=seed)
    else:
        raise ValueError(f"unknown template {template!r}")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    vocab = len(tok)
    sep = tok.convert_tokens_to_ids(",")  # as official configs: the id of ","
    g = torch.Generator().manual_seed(seed)
    vision = _vision_tensors(g)
    llm_tensors = _llm_tensors(vocab, g, llm)
    proj_tensors = _projector_tensors(projector, g, llm["hidden_size"])
    slime = projector == "gated"
    eos = tok.eos_token_id if template == "vicuna_v1" else [tok.convert_tokens_to_ids("<|end_of_text|>"),
                                                             tok.convert_tokens_to_ids("<|eot_id|>")]
    config = {"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama", "vocab_size": vocab,
              **llm, "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "float32",
              "bos_token_id": tok.bos_token_id, "eos_token_id": eos, "pad_token_id": None,
              "mm_vision_tower": TOWER_DIR, "mm_hidden_size": VISION["hidden_size"],
              "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
              "mm_projector_type": projector, "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
              "image_aspect_ratio": "anyres" if slime else "pad",
              "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
              "mm_patch_merge_type": "spatial" if slime else "flat",
              "tokenizer_model_max_length": 2048, "use_cache": True}
    if slime:
        config.update({"mm_resampler_type": "cosine", "mm_resampler_dim": 144, "mm_resampler_topp": 0.95,
                       "mm_resampler_temp": 1.0, "seperator": sep, "mm_learnable_gated": -1,
                       "use_global_only": False, "use_local_only": False})
    generation = {"bos_token_id": tok.bos_token_id, "eos_token_id": eos, "do_sample": False}
    return TinyParts(llm_tensors, proj_tensors, vision, config, generation, g)


def write_tower(vision: dict[str, torch.Tensor], directory: Path) -> None:
    directory.mkdir()
    save(vision, directory, "safetensors")
    (directory / "config.json").write_text(json.dumps({"architectures": ["CLIPVisionModel"], **VISION}, indent=2))
    (directory / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2))
