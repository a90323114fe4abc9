"""CLIP ViT vision encoder (spec section 9), weight names as in `CLIPVisionModel`.

Only the layers up to `mm_vision_select_layer` are built: with -2 the last encoder layer never
contributes to the selected hidden state, so it is neither loaded nor run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import VisionConfig


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


_ACTS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class CLIPAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.head_dim = d // self.num_heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape  # [views, 577, Dv]
        q, k, v = (p(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v)  # [views, heads, 577, hd]
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.act = _ACTS[cfg.hidden_act]
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.empty(cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, kernel_size=cfg.patch_size,
                                         stride=cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(cfg.num_patches + 1, cfg.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixels).flatten(2).transpose(1, 2)  # [views, 576, Dv]
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight  # [views, 577, Dv]


class CLIPVisionTower(nn.Module):
    """pixels `[views, 3, 336, 336]` -> features `[views, 576, Dv]` (or 577 with `cls_patch`)."""

    def __init__(self, cfg: VisionConfig, *, select_layer: int = -2, select_feature: str = "patch"):
        super().__init__()
        total = cfg.num_hidden_layers
        # hidden_states[0] is the embedding output; hidden_states[i] the output of layer i.
        index = total + 1 + select_layer if select_layer < 0 else select_layer
        if not 0 <= index <= total:
            raise ValueError(f"mm_vision_select_layer {select_layer} is out of range for {total} layers")
        self.cfg = cfg
        self.num_layers_used = index
        self.select_feature = select_feature
        self.embeddings = CLIPEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # (sic) CLIP's name
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(index))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.pre_layrnorm(self.embeddings(pixels.to(self.embeddings.patch_embedding.weight.dtype)))
        for layer in self.layers:
            x = layer(x)
        return x[:, 1:] if self.select_feature == "patch" else x

    def checkpoint_names(self, prefix: str = "vision_model.") -> dict[str, str]:
        """Our parameter name -> `CLIPVisionModel` state-dict name."""
        out = {}
        for name, _ in self.named_parameters():
            if name.startswith("layers."):
                ckpt = "encoder." + name
            else:
                ckpt = name
            out[name] = prefix + ckpt
        return out
