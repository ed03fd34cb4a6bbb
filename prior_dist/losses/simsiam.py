"""SimSiam loss of local alignment, image side (spec section 3): the local image loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prior_dist.losses.precision import fp32


def simsiam_loss(
    predicted_patches_BPD: torch.Tensor,
    patches_BPD: torch.Tensor,
    predicted_context_BPD: torch.Tensor,
    context_BPD: torch.Tensor,
    patch_mask_BP: torch.Tensor | None = None,
) -> torch.Tensor:
    """`-(mean cos(pred(V), sg(C)) + mean cos(pred(C), sg(V))) / 2` over (valid) patches, from
    the predictor's outputs `pred(V)`, `pred(C)` (the model's `predicted_patches`,
    `predicted_context`)."""
    a = F.cosine_similarity(fp32(predicted_patches_BPD), fp32(context_BPD.detach()), dim=-1)
    b = F.cosine_similarity(fp32(predicted_context_BPD), fp32(patches_BPD.detach()), dim=-1)
    if patch_mask_BP is None:
        return -(a.mean() + b.mean()) / 2
    w = fp32(patch_mask_BP)
    return -((a * w).sum() + (b * w).sum()) / (2 * w.sum().clamp_min(1))
