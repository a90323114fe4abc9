"""Vision-to-LLM projectors: SliME's global mixture of adapters and LLaVA's linear / MLP ones."""

from __future__ import annotations

import re

import torch
from torch import nn

from .config import SliMEConfig
from .local_compressor import Resampler

GLOBAL_TOKENS = 576  # the reference mixes experts only for sequences of this length


class GatedProjector(nn.Module):
    """Mixture of two adapters over the global view (spec section 4).

    expert 0: `projection(G)`; expert 1: `projection(attn(G))`; per-token gate
    `softmax(G @ w_gate)` renormalised over the top 2 (both). Local tokens use expert 0 alone.
    """

    def __init__(self, cfg: SliMEConfig):
        super().__init__()
        dv, d = cfg.mm_hidden_size, cfg.hidden_size
        grid = int(GLOBAL_TOKENS**0.5)
        self.attn = Resampler(grid_size=grid, embed_dim=dv, num_heads=dv // 128, kv_dim=dv)
        self.projection = nn.Sequential(nn.Linear(dv, d), nn.GELU(), nn.Linear(d, d))
        self.w_gate = nn.Parameter(torch.zeros(dv, 2), requires_grad=False)
        self.learnable_gated = cfg.mm_learnable_gated

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Expert 0 only: `[..., Dv]` -> `[..., D]`."""
        return self.projection(x)

    def gates(self, g: torch.Tensor) -> torch.Tensor:
        """`[N, 576, Dv]` -> `[N, 576, 2]` normalised top-2 gates."""
        probs = torch.softmax(g @ self.w_gate.to(g.dtype), dim=-1)
        top, idx = probs.topk(2, dim=-1)
        top = top / (top.sum(-1, keepdim=True) + 1e-6)
        return torch.zeros_like(probs).scatter(-1, idx, top)

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        """Global CLIP features `[N, 576, Dv]` -> `[N, 576, D]`."""
        if g.shape[1] != GLOBAL_TOKENS:
            return self.project(g)
        experts = [self.projection(g), self.projection(self.attn(g))]
        if self.learnable_gated >= 0:
            return experts[self.learnable_gated]
        gates = self.gates(g)
        stacked = torch.stack(experts, dim=-1)  # [N, 576, D, 2]
        return torch.matmul(stacked, gates.unsqueeze(-1)).squeeze(-1)


class MLPProjector(nn.Module):
    """LLaVA's `linear` / `mlpNx_gelu` projector: `[..., Dv]` -> `[..., D]`."""

    def __init__(self, cfg: SliMEConfig, depth: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(cfg.mm_hidden_size, cfg.hidden_size)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(cfg.hidden_size, cfg.hidden_size)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    project = forward

    def checkpoint_names(self) -> dict[str, str]:
        # LLaVA stores `mm_projector.weight` (linear) or `mm_projector.{0,2}.weight` (MLP).
        if len(self.layers) == 1:
            return {"layers.0.weight": "weight", "layers.0.bias": "bias"}
        return {n: n[len("layers."):] for n, _ in self.named_parameters()}


def build_projector(cfg: SliMEConfig) -> nn.Module:
    kind = cfg.mm_projector_type
    if kind == "gated":
        return GatedProjector(cfg)
    if kind == "linear":
        return MLPProjector(cfg, 1)
    m = re.fullmatch(r"mlp(\d+)x_gelu", kind)
    if m:
        return MLPProjector(cfg, int(m.group(1)))
    raise ValueError(f"unsupported mm_projector_type {kind!r} (supported: gated, linear, mlpNx_gelu)")
