"""Prompt tokenisation with image slots, the way the reference's `tokenizer_image_token` does it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from .config import IMAGE_TOKEN_INDEX
from .templates import IMAGE, Piece


def split_at_images(pieces: Sequence[Piece]) -> list[str]:
    """Prompt pieces -> the text chunks between image slots (num_images + 1 chunks)."""
    chunks = [""]
    for p in pieces:
        if p is IMAGE:
            chunks.append("")
        else:
            chunks[-1] += p  # type: ignore[operator]
    return chunks


def tokenize_prompt(tokenizer: Any, pieces: Sequence[Piece]) -> list[int]:
    """Tokenise each text chunk on its own (with BOS), drop the BOS of all but the first and join
    the chunks with `IMAGE_TOKEN_INDEX` (-200) placeholders."""
    chunk_ids = [tokenizer(chunk).input_ids for chunk in split_at_images(pieces)]
    bos = tokenizer.bos_token_id
    offset = 1 if chunk_ids[0] and bos is not None and chunk_ids[0][0] == bos else 0
    ids: list[int] = chunk_ids[0][:offset]
    for i, chunk in enumerate(chunk_ids):
        if i:
            ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(chunk[offset:])
    return ids


@dataclass(frozen=True)
class PreparedImage:
    """One image ready for the vision tower (CPU-side work done), or a reference to features
    already in the vision cache (`pixels` None)."""

    pixels: Any  # np.ndarray `[views, 3, 336, 336]` float32, or None when cached
    grid: tuple[int, int] | None  # (cols, rows); None for single-view LLaVA images
    digest: str = ""  # vision-cache key (hash of the uploaded bytes); "" = not cacheable

    def max_rows(self, cfg: Any, *, global_tokens: int = 576) -> int:
        """Upper bound of the LLM rows this image becomes (before selection)."""
        if self.grid is None or not cfg.has_local_branch:
            return global_tokens
        local = self.grid[0] * self.grid[1] * cfg.local_grid**2
        if cfg.use_global_only:
            return global_tokens
        if cfg.use_local_only:
            return local
        return global_tokens + 1 + local


def prepare_image(image: Any, cfg: Any, digest: str = "", norm: Any = None) -> PreparedImage:
    """RGB PIL image -> pixels per the checkpoint's `image_aspect_ratio` (SliME: `anyres` slicing),
    normalised with the tower's processor settings (`norm`, default CLIP's)."""
    from .slicing import CLIP_NORM, preprocess, preprocess_single

    norm = norm or CLIP_NORM
    if cfg.has_local_branch or cfg.image_aspect_ratio == "anyres":
        pixels, grid = preprocess(image, norm=norm)
    else:
        pixels, grid = preprocess_single(image, pad=cfg.image_aspect_ratio == "pad", norm=norm), None
    return PreparedImage(pixels, grid, digest)
