"""Reconstruction and prototype losses (spec sections 4 and 5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prior_dist.losses.precision import fp32


def sentence_mean(
    values_BS: torch.Tensor, mask_BS: torch.Tensor, rows_per_rank: torch.Tensor | None = None
) -> torch.Tensor:
    """The mean of `values` over valid rows (sentences), two ways.

    `rows_per_rank` None (`heads.sentence_loss_mean: per_report`): over each report's valid
    rows, then over the B reports (empty reports give 0); averaged over ranks of equal B this is
    the global-batch value. A tensor (`pooled`, the reference code's one mean over every
    sentence of the batch): this rank's sum over the global batch's valid rows divided by the
    number of ranks, so that the mean over ranks (what data parallelism averages) is the pooled
    mean over the global batch, on any number of ranks. It carries no gradient."""
    m = fp32(mask_BS)
    if rows_per_rank is None:
        return ((values_BS * m).sum(1) / m.sum(1).clamp_min(1)).mean()
    return (values_BS * m).sum() / rows_per_rank.detach().clamp_min(1e-12)


def prototype_l1_loss(
    sentences_BSD: torch.Tensor,
    prototypes_BSD: torch.Tensor,
    mask_BS: torch.Tensor,
    rows_per_rank: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean |x - q| over each valid sentence's elements, then `sentence_mean` over sentences."""
    diff = (fp32(sentences_BSD) - fp32(prototypes_BSD)).abs().mean(-1)
    return sentence_mean(diff, mask_BS, rows_per_rank)


def image_reconstruction_loss(reconstruction: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    return F.l1_loss(fp32(reconstruction), fp32(image))


def sentence_generation_loss(matched_BQD: torch.Tensor, targets_BQD: torch.Tensor) -> torch.Tensor:
    """L_spg: mean L1 over every row, zero-padded target rows included."""
    return F.l1_loss(fp32(matched_BQD), fp32(targets_BQD))


def prototype_kl_loss(
    real_logits_BQK: torch.Tensor,
    matched_logits_BQK: torch.Tensor,
    mask_BQ: torch.Tensor,
    rows_per_rank: torch.Tensor | None = None,
) -> torch.Tensor:
    """L_kl: KL(softmax(E Wᵀ) || softmax(Ŷ Wᵀ)) from the two logit tensors, summed over
    prototypes, then `sentence_mean` over real rows."""
    log_p = F.log_softmax(fp32(real_logits_BQK), dim=-1)
    log_q = F.log_softmax(fp32(matched_logits_BQK), dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return sentence_mean(kl, mask_BQ, rows_per_rank)
