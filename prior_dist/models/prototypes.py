"""Sentence prototype memory bank (spec section 4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def gumbel_from_uniform(uniform: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) samples from U(0, 1) samples, clamped away from 0 and 1."""
    tiny = torch.finfo(uniform.dtype).tiny
    return -torch.log(-torch.log(uniform.clamp(tiny, 1.0 - 1e-7)))


class SentencePrototypeBank(nn.Module):
    """A learned codebook `W [K, D]` ~ N(0, 1); sentences become Gumbel-softmax mixtures of it."""

    def __init__(self, num_prototypes: int, dim: int, tau: float = 0.9, eval_gumbel: bool = False):
        super().__init__()
        self.prototypes = nn.Parameter(torch.randn(num_prototypes, dim))
        self.num_prototypes = num_prototypes  # the weight's shape is a partition under ZeRO-3
        self.tau = tau
        self.eval_gumbel = eval_gumbel

    def forward(
        self,
        x_ND: torch.Tensor,
        uniform_noise: torch.Tensor | None = None,
        logits_only: bool = False,
    ) -> torch.Tensor:
        """`q = p W` with `p = softmax((x Wᵀ + g) / tau)`, computed in fp32.

        Noise is drawn in training (and at evaluation with `eval_gumbel`, the reference quirk);
        pass `uniform_noise` (same shape as the logits, U(0, 1)) to tie it to the samples.
        `logits_only` returns `x Wᵀ` (fp32): still through forward, where ZeRO-3 gathers `W`.
        """
        logits = x_ND.float() @ self.prototypes.float().t()
        if logits_only:
            return logits
        if self.training or self.eval_gumbel:
            if uniform_noise is None:
                uniform_noise = torch.rand_like(logits)
            logits = logits + gumbel_from_uniform(uniform_noise.float())
        weights = F.softmax(logits / self.tau, dim=-1)
        return (weights @ self.prototypes.float()).to(x_ND.dtype)
