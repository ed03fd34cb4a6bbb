"""Collectives on the public torch.distributed API (any backend): gathers and sums that carry
gradients, and a gather of unequal row counts.

(`torch.distributed.nn.functional` does the same but is deprecated in this torch.)
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        ctx.rows = x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # Each rank's loss reaches every rank's rows: sum the gradients, keep our rows.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad.narrow(0, ctx.rank * ctx.rows, ctx.rows), None


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = x.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_gather_with_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """`[W * B, ...]` from every rank's `[B, ...]` (equal B), differentiable."""
    return _AllGather.apply(x, group)


def all_reduce_sum_with_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    return _AllReduceSum.apply(x, group)


def gather_rows(x_ND: torch.Tensor) -> torch.Tensor:
    """Every rank's rows, rank order, for unequal row counts (padded to the largest)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x_ND
    count = torch.tensor([len(x_ND)], dtype=torch.long)
    counts = [torch.zeros_like(count) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, count)
    largest = int(max(c.item() for c in counts))
    padded = x_ND.new_zeros((largest, x_ND.shape[1]))
    padded[: len(x_ND)] = x_ND
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[: int(c.item())] for p, c in zip(parts, counts)])
