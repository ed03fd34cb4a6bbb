"""CLIP-style attention pooling (image map, report sentences) and masked sentence means.

Shapes: B batch, N tokens, C channels, L text tokens, S sentences.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn

from prior_dist.models.attention import attention


def init_projection(linear: nn.Linear) -> None:
    """N(0, in_features^-1/2) weights (spec section 1), zero bias."""
    nn.init.normal_(linear.weight, std=linear.in_features**-0.5)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


class AttentionPool(nn.Module):
    """Prepend the (masked) mean token, attend from it over all tokens, return its output.

    Only token 0's output is used, so only its query is computed: the same maths as pooling
    every token and keeping the first, at 1/N of the query cost.
    """

    def __init__(self, channels: int, num_heads: int, num_positions: int | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.positional_embedding = (
            nn.Parameter(torch.randn(num_positions, channels) / math.sqrt(channels))
            if num_positions is not None
            else None
        )
        self.q_proj = nn.Linear(channels, channels)
        self.k_proj = nn.Linear(channels, channels)
        self.v_proj = nn.Linear(channels, channels)
        self.c_proj = nn.Linear(channels, channels)
        for linear in (self.q_proj, self.k_proj, self.v_proj, self.c_proj):
            init_projection(linear)

    def forward(
        self, tokens_BNC: torch.Tensor, mask_BN: torch.Tensor | None = None
    ) -> torch.Tensor:
        if mask_BN is None:
            mean = tokens_BNC.mean(dim=1, keepdim=True)
            key_mask = None
        else:
            weights = mask_BN.to(tokens_BNC.dtype)[..., None]
            mean = (tokens_BNC * weights).sum(1, keepdim=True) / weights.sum(
                1, keepdim=True
            ).clamp_min(1)
            key_mask = torch.cat([mask_BN.new_ones(mask_BN.shape[0], 1), mask_BN], dim=1)
        x = torch.cat([mean, tokens_BNC], dim=1)
        if self.positional_embedding is not None:
            if x.shape[1] != self.positional_embedding.shape[0]:
                built = self.positional_embedding.shape[0] - 1
                raise ValueError(
                    f"attention pool built for {built} tokens, got "
                    f"{x.shape[1] - 1}: check image.image_size"
                )
            x = x + self.positional_embedding.to(x.dtype)
        q = rearrange(self.q_proj(x[:, :1]), "b n (h d) -> b h n d", h=self.num_heads)
        k = rearrange(self.k_proj(x), "b n (h d) -> b h n d", h=self.num_heads)
        v = rearrange(self.v_proj(x), "b n (h d) -> b h n d", h=self.num_heads)
        out = attention(q, k, v, impl="sdpa", key_mask=key_mask)
        return self.c_proj(rearrange(out, "b h n d -> b n (h d)")[:, 0])


def sentence_means(
    tokens_BLD: torch.Tensor,
    sentence_index_BL: torch.Tensor,
    max_sentences: int | None = None,
    num_slots: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean token embedding per sentence -> (sentences [B, S, D], mask [B, S]).

    `sentence_index` is -1 for special and pad tokens. Sentences with no token left are
    dropped and the rest renumbered without gaps, so valid sentences come first; with
    `max_sentences` only the first that many are kept. `num_slots` (>= the largest index + 1)
    saves reading that from the device; more slots than sentences only add masked rows.
    """
    batch, _, dim = tokens_BLD.shape
    if num_slots is None:
        num_slots = int(sentence_index_BL.max()) + 1 if sentence_index_BL.numel() else 0
    num_slots = max(num_slots, 1)
    belongs = sentence_index_BL >= 0
    slot = sentence_index_BL.clamp_min(0)
    counts = torch.zeros(batch, num_slots, device=tokens_BLD.device, dtype=torch.long)
    counts.scatter_add_(1, slot, belongs.long())
    present = counts > 0
    # Renumber: a sentence's new index is the number of present sentences before it.
    renumber = present.long().cumsum(1) - 1
    new_slot = renumber.gather(1, slot)
    keep = belongs
    num_out = num_slots if max_sentences is None else min(num_slots, max_sentences)
    if max_sentences is not None:
        keep = keep & (new_slot < max_sentences)
    flat = torch.arange(batch, device=tokens_BLD.device)[:, None] * num_out + new_slot.clamp(
        0, num_out - 1
    )
    weights = keep.to(tokens_BLD.dtype)
    sums = tokens_BLD.new_zeros(batch * num_out, dim).index_add_(
        0, flat.flatten(), (tokens_BLD * weights[..., None]).flatten(0, 1)
    )
    totals = tokens_BLD.new_zeros(batch * num_out).index_add_(0, flat.flatten(), weights.flatten())
    sentences = rearrange(sums / totals.clamp_min(1)[:, None], "(b s) d -> b s d", b=batch)
    mask = rearrange(totals > 0, "(b s) -> b s", b=batch)
    return sentences, mask
