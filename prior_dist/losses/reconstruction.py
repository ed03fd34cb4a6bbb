"""Reconstruction and prototype losses (spec sections 4 and 5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prior_dist.losses.precision import fp32


def prototype_l1_loss(sentences_BSD: torch.Tensor, prototypes_BSD: torch.Tensor,
                      mask_BS: torch.Tensor) -> torch.Tensor:
    """Mean |x - q| over the valid sentences' elements."""
    w = fp32(mask_BS)[..., None]
    diff = (fp32(sentences_BSD) - fp32(prototypes_BSD)).abs() * w
    return diff.sum() / (w.sum() * sentences_BSD.shape[-1]).clamp_min(1)


def image_reconstruction_loss(reconstruction: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    return F.l1_loss(fp32(reconstruction), fp32(image))


def sentence_generation_loss(matched_BQD: torch.Tensor, targets_BQD: torch.Tensor) -> torch.Tensor:
    """L_spg: mean L1 over every row, zero-padded target rows included."""
    return F.l1_loss(fp32(matched_BQD), fp32(targets_BQD))


def prototype_kl_loss(real_BQD: torch.Tensor, matched_BQD: torch.Tensor,
                      prototypes_KD: torch.Tensor, mask_BQ: torch.Tensor) -> torch.Tensor:
    """L_kl: KL(softmax(E Wᵀ) || softmax(Ŷ Wᵀ)), summed over prototypes, mean over real rows."""
    w = fp32(prototypes_KD)
    log_p = F.log_softmax(fp32(real_BQD) @ w.t(), dim=-1)
    log_q = F.log_softmax(fp32(matched_BQD) @ w.t(), dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    m = fp32(mask_BQ)
    return (kl * m).sum() / m.sum().clamp_min(1)
