"""SliME model stages: vision features -> global and local image rows -> LLM input embeddings.

The chain, per image: CLIP `[views, 576, Dv]` -> global mixture of adapters `[576, D]` and local
compression + projection + spatial merge `[P*144, D]` (question-independent, cacheable) ->
cosine selection against the prompt's text embeddings `[k, D]` -> rows
`[global; separator; selected local]` spliced in place of the image placeholder.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn

from .adapters import build_projector
from .config import IMAGE_TOKEN_INDEX, SliMEConfig, VisionConfig
from .llm import LlamaForCausalLM
from .local_compressor import Resampler
from .selection import select_tokens, selection_scores
from .vision import CLIPVisionTower


@dataclass
class ImageFeatures:
    """The question-independent part of one image's rows (what the vision cache stores)."""

    global_rows: torch.Tensor | None  # [576, D]
    local_rows: torch.Tensor | None  # [rows*12 * cols*12, D], raster order of the whole image
    grid: tuple[int, int] | None  # (cols, rows); None for single-view LLaVA images
    num_views: int

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.global_rows, self.local_rows) if t is not None)


@dataclass(frozen=True)
class ImageReport:
    """What the pipeline did with one image."""

    grid: tuple[int, int] | None
    views: int
    global_tokens: int
    local_tokens: int  # before selection
    local_kept: int
    kept_mask: tuple[bool, ...] | None = None  # per local token (raster order), when requested
    rows: int = 0  # LLM positions the image took
    selection: str = ""  # digest of which local tokens were kept ("" without selection)


class SliMEForCausalLM(nn.Module):
    """A SliME (or plain LLaVA) checkpoint's modules, built from its config."""

    def __init__(self, cfg: SliMEConfig, vision_cfg: VisionConfig | None):
        super().__init__()
        self.cfg = cfg
        self.llm = LlamaForCausalLM(cfg)
        self.vision_tower: CLIPVisionTower | None = None
        self.mm_projector: nn.Module | None = None
        self.post_qformer: Resampler | None = None
        if vision_cfg is not None:
            self.vision_tower = CLIPVisionTower(vision_cfg, select_layer=cfg.mm_vision_select_layer,
                                                select_feature=cfg.mm_vision_select_feature)
            self.mm_projector = build_projector(cfg)
            if cfg.has_local_branch:
                dv = cfg.mm_hidden_size
                self.post_qformer = Resampler(grid_size=cfg.local_grid, embed_dim=dv, num_heads=dv // 128, kv_dim=dv)

    # -- checkpoint names ------------------------------------------------------------------------
    def checkpoint_names(self) -> dict[str, str]:
        """Our parameter name -> the official checkpoint's key."""
        names: dict[str, str] = {}
        for n, _ in self.llm.named_parameters():
            names["llm." + n] = n  # model.embed_tokens..., model.layers..., lm_head
        if self.vision_tower is not None:
            for ours, theirs in self.vision_tower.checkpoint_names().items():
                names["vision_tower." + ours] = "model.vision_tower.vision_tower." + theirs
        if self.mm_projector is not None:
            sub = getattr(self.mm_projector, "checkpoint_names", None)
            mapping = sub() if sub else {n: n for n, _ in self.mm_projector.named_parameters()}
            for ours, theirs in mapping.items():
                names["mm_projector." + ours] = "model.mm_projector." + theirs
        if self.post_qformer is not None:
            for n, _ in self.post_qformer.named_parameters():
                names["post_qformer." + n] = "model.sampler.post_qformer." + n
        return names

    @property
    def device(self) -> torch.device:
        return self.llm.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.model.embed_tokens.weight.dtype

    # -- stages ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_images(self, pixels: list[torch.Tensor], grids: list[tuple[int, int] | None]) -> list[ImageFeatures]:
        """Per image `[views, 3, 336, 336]` -> question-independent features. All views of all
        images go through CLIP as one batch."""
        assert self.vision_tower is not None and self.mm_projector is not None, "text-only checkpoint"
        counts = [p.shape[0] for p in pixels]
        batch = torch.cat(pixels).to(self.device, self.dtype)
        feats = self.vision_tower(batch).split(counts)  # each [views, 576, Dv]
        cfg = self.cfg
        out = []
        for f, grid in zip(feats, grids):
            if self.post_qformer is None:  # LLaVA: every view through the projector
                out.append(ImageFeatures(self.mm_projector(f).flatten(0, 1), None, grid, f.shape[0]))
                continue
            global_rows = None if cfg.use_local_only else self.mm_projector(f[:1])[0]  # [576, D]
            local_rows = None
            if not cfg.use_global_only:
                assert grid is not None
                cols, rows = grid
                g = cfg.local_grid
                local = self.mm_projector.project(self.post_qformer(f[1:]))  # [P, 144, D]
                local_rows = (local.view(rows, cols, g, g, -1).permute(0, 2, 1, 3, 4)
                              .reshape(rows * g * cols * g, -1))  # raster order of the whole image
            out.append(ImageFeatures(global_rows, local_rows, grid, f.shape[0]))
        return out

    @torch.inference_mode()
    def image_rows(self, feats: ImageFeatures, text_embeds: torch.Tensor, num_images: int,
                   *, slime_selection: bool = False) -> tuple[torch.Tensor, ImageReport]:
        """Rows that replace one placeholder: `[global 576; separator 1; kept local k]` x D."""
        cfg = self.cfg
        if self.post_qformer is None or feats.local_rows is None:
            rows = feats.global_rows
            assert rows is not None
            return rows, ImageReport(feats.grid, feats.num_views, rows.shape[0], 0, 0, rows=rows.shape[0])
        local = feats.local_rows
        # The reference truncates the text embeddings (with one zero row per image) to the
        # training context before scoring.
        scores = selection_scores(local, text_embeds, num_pad=num_images)
        keep = select_tokens(scores, topp=cfg.mm_resampler_topp, temp=cfg.mm_resampler_temp)
        kept = local[keep]
        keep_host = keep.cpu()
        selection = hashlib.blake2b(keep_host.numpy().tobytes(), digest_size=16).hexdigest()
        mask = None
        if slime_selection:
            m = torch.zeros(local.shape[0], dtype=torch.bool)
            m[keep_host] = True
            mask = tuple(m.tolist())
        num_global = 0 if feats.global_rows is None else feats.global_rows.shape[0]
        rows = kept.shape[0] + (num_global + 1 if num_global else 0)  # [global; separator;] kept
        report = ImageReport(feats.grid, feats.num_views, num_global, local.shape[0], kept.shape[0], mask, rows, selection)
        if feats.global_rows is None:
            return kept, report
        sep = self.llm.embed(torch.tensor([cfg.separator_id], device=local.device))
        return torch.cat([feats.global_rows, sep, kept]), report

    @torch.inference_mode()
    def embed_prompt(self, input_ids: list[int], images: list[ImageFeatures], *,
                     slime_selection: bool = False) -> tuple[torch.Tensor, list[ImageReport]]:
        """input_ids with -200 placeholders -> LLM input embeddings `[T, D]` and per-image reports."""
        slots = [i for i, t in enumerate(input_ids) if t == IMAGE_TOKEN_INDEX]
        if len(slots) != len(images):
            raise ValueError(f"prompt has {len(slots)} image placeholders but {len(images)} images were given")
        text_ids = torch.tensor([t for t in input_ids if t != IMAGE_TOKEN_INDEX], device=self.device)
        text_embeds = self.llm.embed(text_ids)  # [Lt, D]
        limit = self.cfg.tokenizer_model_max_length
        select_text = text_embeds
        num_pad = len(images)
        if limit is not None and text_embeds.shape[0] + num_pad > limit:
            select_text = text_embeds[:limit]
            num_pad = max(0, limit - text_embeds.shape[0])
        parts: list[torch.Tensor] = []
        reports: list[ImageReport] = []
        cursor = 0  # into text_embeds
        prev = -1
        for slot, feats in zip(slots, images):
            n_text = slot - prev - 1
            parts.append(text_embeds[cursor:cursor + n_text])
            cursor += n_text
            rows, report = self.image_rows(feats, select_text, num_pad, slime_selection=slime_selection)
            parts.append(rows.to(text_embeds.dtype))
            reports.append(report)
            prev = slot
        parts.append(text_embeds[cursor:])
        return torch.cat(parts), reports
