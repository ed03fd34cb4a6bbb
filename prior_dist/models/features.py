"""What the towers hand the heads, and the token <-> feature-map layouts.

Shapes: B batch, P patches (h * w), D embedding width, L tokens, S sentences, C channels.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from einops import rearrange


class ImageFeatures(NamedTuple):
    global_embedding: torch.Tensor  # [B, D]
    patch_tokens: torch.Tensor  # [B, P, D]
    grid: tuple[int, int]  # (h, w), h * w == P


class TextFeatures(NamedTuple):
    token_embeddings: torch.Tensor  # [B, L, D]
    sentences: torch.Tensor  # [B, S, D]
    sentence_mask: torch.Tensor  # [B, S] bool, valid sentences first


def map_to_tokens(feature_map_BCHW: torch.Tensor, layout: str) -> torch.Tensor:
    """`[B, C, H, W]` -> `[B, H*W, C]`: one token per location (`spatial`), or the reference's
    plain `view(B, -1, C)` of the channel-major buffer (`reference_view`, spec section 1)."""
    if layout == "spatial":
        return rearrange(feature_map_BCHW, "b c h w -> b (h w) c")
    batch, channels = feature_map_BCHW.shape[:2]
    return feature_map_BCHW.reshape(batch, -1, channels)


def tokens_to_map(tokens_BPC: torch.Tensor, grid: tuple[int, int], layout: str) -> torch.Tensor:
    """The inverse of `map_to_tokens` for the same layout."""
    h, w = grid
    if layout == "spatial":
        return rearrange(tokens_BPC, "b (h w) c -> b c h w", h=h, w=w)
    batch, _, channels = tokens_BPC.shape
    return tokens_BPC.reshape(batch, channels, h, w)
