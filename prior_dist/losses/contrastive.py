"""InfoNCE losses: the global image-report loss (across ranks) and the intra-report loss."""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from prior_dist.losses.precision import fp32


class Gather(Protocol):
    """Concatenates a `[B, D]` tensor from every data-parallel rank, gradients flowing back."""

    rank: int
    world_size: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class SingleProcessGather:
    """The gather of a run in one process: the identity."""

    rank = 0
    world_size = 1

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x


def global_contrastive_loss(
    image_BD: torch.Tensor,
    text_BD: torch.Tensor,
    logit_scale: torch.Tensor,
    gather: Gather | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE of this rank's rows against the whole global batch (spec section 2).

    Labels are offset by the global rank. Every rank must hold the same B (the loader
    guarantees it). Averaged over ranks, the result and its gradients equal the full-batch loss.
    """
    gather = gather or SingleProcessGather()
    image = F.normalize(fp32(image_BD), dim=-1)
    text = F.normalize(fp32(text_BD), dim=-1)
    all_image, all_text = gather(image), gather(text)
    batch = image.shape[0]
    if all_image.shape[0] != batch * gather.world_size:
        raise ValueError(
            f"global loss: gathered {all_image.shape[0]} rows from "
            f"{gather.world_size} ranks of {batch}; per-rank batches must be equal"
        )
    labels = torch.arange(batch, device=image.device) + gather.rank * batch
    logits_image = logit_scale * image @ all_text.t()
    logits_text = logit_scale * text @ all_image.t()
    return (F.cross_entropy(logits_image, labels) + F.cross_entropy(logits_text, labels)) / 2


def intra_report_contrastive_loss(
    context_BSD: torch.Tensor,
    sentences_BSD: torch.Tensor,
    mask_BS: torch.Tensor,
    logit_scale: torch.Tensor,
) -> torch.Tensor:
    """Sentence j's attended image context must pick sentence j among its report's sentences.

    Symmetric; mean over each report's sentences, then over all B reports (a one-sentence report
    gives exactly zero, as does a report without sentences), so the mean over ranks of equal B
    is the mean over the global batch.
    """
    context = F.normalize(fp32(context_BSD), dim=-1)
    sentences = F.normalize(fp32(sentences_BSD), dim=-1)
    logits = logit_scale * torch.einsum("bid,bjd->bij", context, sentences)
    valid = mask_BS.bool()
    pair_mask = valid[:, :, None] & valid[:, None, :]
    # A large finite fill, not -inf: masked entries vanish from every logsumexp, and rows that
    # are masked out entirely stay finite so their (discarded) gradients are not NaN.
    logits = logits.masked_fill(~pair_mask, -1e9)
    diagonal = torch.diagonal(logits, dim1=1, dim2=2)
    # Rows: context -> sentences; columns: sentence -> contexts.
    row_lse = torch.logsumexp(logits, dim=2)
    col_lse = torch.logsumexp(logits, dim=1)
    per_row = torch.where(valid, row_lse - diagonal, 0.0) + torch.where(
        valid, col_lse - diagonal, 0.0
    )
    counts = fp32(valid).sum(1)
    return (per_row.sum(1) / (2 * counts.clamp_min(1))).mean()
