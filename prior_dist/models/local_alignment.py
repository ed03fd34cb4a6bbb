"""Local alignment (spec section 3): single-head sigmoid cross-attention in both directions.

Sentence-as-query gathers image patches for each sentence (`text_context [B, S, D]`);
patch-as-query gathers sentences for each patch (`image_context [B, P, D]`). Six projections,
scale 1/sqrt(D), no output projection or residual. Padded sentences contribute exactly zero.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from prior_dist.ops.local_attention import local_attention


class LocalAlignmentOutput(NamedTuple):
    text_context: torch.Tensor  # C_t [B, S, D]
    image_context: torch.Tensor  # C_i [B, P, D]
    sentence_to_patch: torch.Tensor | None  # A_ti [B, S, P] when asked for
    patch_to_sentence: torch.Tensor | None  # A_it [B, P, S] when asked for


class LocalAlignment(nn.Module):
    def __init__(self, dim: int, impl: str = "auto"):
        super().__init__()
        self.impl = impl
        self.scale = 1.0 / math.sqrt(dim)
        self.text_query = nn.Linear(dim, dim)
        self.text_key = nn.Linear(dim, dim)
        self.text_value = nn.Linear(dim, dim)
        self.image_query = nn.Linear(dim, dim)
        self.image_key = nn.Linear(dim, dim)
        self.image_value = nn.Linear(dim, dim)

    def forward(
        self,
        patches_BPD: torch.Tensor,
        sentences_BSD: torch.Tensor,
        sentence_mask_BS: torch.Tensor,
        patch_mask_BP: torch.Tensor | None = None,
        return_attention: bool = False,
    ) -> LocalAlignmentOutput:
        kwargs = {
            "scale": self.scale,
            "activation": "sigmoid",
            "impl": self.impl,
            "return_attention": return_attention,
        }
        text_ctx = local_attention(
            self.text_query(sentences_BSD),
            self.image_key(patches_BPD),
            self.image_value(patches_BPD),
            sentence_mask_BS,
            patch_mask_BP,
            **kwargs,
        )
        image_ctx = local_attention(
            self.image_query(patches_BPD),
            self.text_key(sentences_BSD),
            self.text_value(sentences_BSD),
            patch_mask_BP,
            sentence_mask_BS,
            **kwargs,
        )
        if return_attention:
            (text_ctx, a_ti), (image_ctx, a_it) = text_ctx, image_ctx
            return LocalAlignmentOutput(text_ctx, image_ctx, a_ti, a_it)
        return LocalAlignmentOutput(text_ctx, image_ctx, None, None)


class Predictor(nn.Module):
    """SimSiam predictor: Linear(D, D/2) -> ReLU -> Linear(D/2, D)."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, dim // 2), nn.ReLU(inplace=True), nn.Linear(dim // 2, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
