"""Batch norm synchronised across ranks, on any backend.

torch's SyncBatchNorm takes CUDA tensors only; `GlooSyncBatchNorm` all-reduces the batch
statistics (two passes: mean, then the centred second moment) through autograd-aware
collectives, so it runs on gloo and gives the statistics of the global batch. On CUDA the
converter uses torch's own.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from prior_dist.distributed.collectives import all_reduce_sum_with_grad


class GlooSyncBatchNorm(nn.BatchNorm2d):
    """`nn.BatchNorm2d` (same parameters and buffers) with global-batch statistics in training."""

    def _all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return all_reduce_sum_with_grad(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        channels = x.shape[1]
        xf = x.float()
        local_count = torch.tensor([x.numel() / channels], dtype=torch.float32, device=x.device)
        sums = self._all_reduce(torch.cat([xf.sum(dim=(0, 2, 3)), local_count]))
        count = sums[channels]
        mean = sums[:channels] / count
        centred = xf - mean[None, :, None, None]
        var = self._all_reduce((centred * centred).sum(dim=(0, 2, 3))) / count
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = (
                    self.momentum
                    if self.momentum is not None
                    else 1.0 / float(self.num_batches_tracked)
                )
                unbiased = var * count / (count - 1).clamp_min(1)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        out = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            out = (
                out * self.weight.float()[None, :, None, None]
                + self.bias.float()[None, :, None, None]
            )
        return out.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module, device_type: str) -> nn.Module:
    """Every BatchNorm2d synchronised: torch's SyncBatchNorm on CUDA, ours elsewhere."""
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            replacement = GlooSyncBatchNorm(
                child.num_features,
                child.eps,
                child.momentum,
                child.affine,
                child.track_running_stats,
            )
            replacement.load_state_dict(child.state_dict())
            setattr(module, name, replacement)
        else:
            convert_sync_batchnorm(child, device_type)
    return module
