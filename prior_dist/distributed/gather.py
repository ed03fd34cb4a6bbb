"""All-gather with gradient, the `Gather` the global loss takes (prior_dist.losses.contrastive)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from prior_dist.distributed.collectives import all_gather_with_grad


class AllGather:
    """Concatenate `[B, D]` from every rank of `group`; gradients flow back to every rank.

    The backward sums each rank's gradient contributions; with gradients averaged over ranks
    afterwards (DDP, DeepSpeed), the update equals that of the full-batch loss.
    """

    def __init__(self, group: dist.ProcessGroup | None = None):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "AllGather needs an initialised process group; use "
                "prior_dist.losses.SingleProcessGather in a single process"
            )
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return x
        return all_gather_with_grad(x, self.group)
