"""Typed view of a checkpoint's `config.json` (Llama fields plus SliME's multimodal keys)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Token id the reference uses for an image placeholder inside input_ids.
IMAGE_TOKEN_INDEX = -200
IMAGE_PLACEHOLDER = "<image>"
DEFAULT_SEPARATOR_ID = 1919  # the reference's fallback when `seperator` is absent


@dataclass(frozen=True)
class VisionConfig:
    """CLIP vision tower hyper-parameters (a `CLIPVisionConfig` subset)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    num_channels: int = 3

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VisionConfig":
        # A full CLIPModel config nests the vision part under `vision_config`.
        d = d.get("vision_config", d)
        names = cls.__dataclass_fields__.keys()
        return cls(**{k: d[k] for k in names if k in d})

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class SliMEConfig:
    """Everything the model code needs from `config.json`. Architecture never comes from elsewhere."""

    # Llama
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    head_dim: int | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    # Multimodal
    mm_vision_tower: str | None = None
    mm_hidden_size: int = 1024
    mm_vision_select_layer: int = -2
    mm_vision_select_feature: str = "patch"
    mm_projector_type: str = "linear"
    mm_patch_merge_type: str = "flat"
    image_aspect_ratio: str = "square"
    mm_resampler_type: str | None = None
    mm_resampler_dim: int = 144
    mm_resampler_topp: float = 0.95
    mm_resampler_temp: float = 1.0
    separator_id: int = DEFAULT_SEPARATOR_ID
    mm_learnable_gated: int = -1
    use_global_only: bool = False
    use_local_only: bool = False
    mm_use_im_start_end: bool = False
    tokenizer_model_max_length: int | None = None
    model_type: str = "llava_llama"
    vision: VisionConfig | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def has_local_branch(self) -> bool:
        """SliME's question-conditioned local branch (`mm_resampler_type` cosine)."""
        return self.mm_resampler_type not in (None, "identity", "spatial")

    @property
    def is_multimodal(self) -> bool:
        return self.mm_vision_tower is not None or self.vision is not None

    @property
    def local_grid(self) -> int:
        """Side of the square of learnable queries per local tile (144 -> 12)."""
        side = int(round(self.mm_resampler_dim**0.5))
        return side

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SliMEConfig":
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if key not in d:
                raise ValueError(f"config.json lacks the required Llama key {key!r}")
        kwargs: dict[str, Any] = {}
        names = set(cls.__dataclass_fields__) - {"separator_id", "vision", "raw"}
        for k in names:
            if k in d and d[k] is not None:
                kwargs[k] = d[k]
        kwargs.setdefault("num_key_value_heads", d.get("num_attention_heads"))
        # `seperator` (sic) is the checkpoint's spelling.
        kwargs["separator_id"] = int(d.get("seperator", DEFAULT_SEPARATOR_ID))
        if "vision_config" in d:  # our tiny checkpoints and some LLaVA exports embed it
            kwargs["vision"] = VisionConfig.from_dict(d["vision_config"])
        cfg = cls(raw=dict(d), **kwargs)
        cfg.validate()
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> "SliMEConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def validate(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.has_local_branch:
            if self.mm_resampler_type != "cosine":
                raise ValueError(f"unsupported mm_resampler_type {self.mm_resampler_type!r} (supported: cosine, identity)")
            if self.local_grid**2 != self.mm_resampler_dim:
                raise ValueError("mm_resampler_dim must be a square number (144 = 12 x 12)")
            if self.mm_projector_type != "gated":
                raise ValueError("the cosine local branch needs mm_projector_type 'gated'")
        if self.mm_projector_type == "gated" and self.mm_hidden_size % 128:
            raise ValueError("mm_hidden_size must be a multiple of 128 for the gated projector's attention")
        if self.mm_vision_select_feature not in ("patch", "cls_patch"):
            raise ValueError(f"unsupported mm_vision_select_feature {self.mm_vision_select_feature!r}")
